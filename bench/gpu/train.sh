#!/usr/bin/env bash
# bench/gpu/train.sh — DPO with LoRA: `prefer train --device cuda` beside TRL 1.16 + PEFT 0.21
# on the same rows and random-weight model, on one H200. Runs THERE, from the repository root,
# with .gpu/ carried (bench/gpu/prepare.sh, plus .gpu/wheels for TRL):
#
#     bash bench/gpu/train.sh          # results in $OUT/train.log and $OUT/train.json
#
# Workload (GUIDE §5's anchor): PREFER_TRAIN_SHAPES (default qwen05 gemma2b), 64 rows of 256-token
# prompts and 256-token completions, 8 pairs per step, LoRA r 16 alpha 16 dropout 0.05 on the
# seven linear modules, max_length 1024, 10 steps; the median step time over the steps after
# the second (both sides time the whole optimizer step: policy and reference passes,
# backward, optimizer).
set -uo pipefail
OUT=${OUT:-/tmp/prefer-train-out}
W=${PREFER_TRAIN_WORK:-/tmp/prefer-train}
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/train.log") 2>&1
G=.gpu
source "$G/env.sh"
eval "$(bash $G/install-wheels.sh $G/wheels)"
export PREFER_CACHE_DIR=/tmp/prefer-kernels RUST_BACKTRACE=1
TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
STEPS=${PREFER_TRAIN_STEPS:-10}
: >"$OUT/train.json"
for shape in ${PREFER_TRAIN_SHAPES:-qwen05 gemma2b}; do
    m=$W/$shape
    python3 bench/gpu/make_model.py "$shape" "$m" && cp fixtures/tokenizer/* "$m/"
    python3 bench/gpu/make_pairs.py "$m" "$W/rows.jsonl" --rows 64 --prompt 256 --completion 256
    echo "== $shape: prefer"
    rm -rf "$W/out-$shape"
    timeout 300 $G/bin/prefer train --device cuda --model "$m" --data "$W/rows.jsonl" \
        --output-dir "$W/out-$shape" --per-device-train-batch-size 8 --max-steps "$STEPS" \
        --lora-r 16 --lora-alpha 16 --lora-dropout 0.05 --lora-target-modules "$TARGETS" \
        --max-length 1024 --learning-rate 1e-5 --logging-steps 1 --save-steps 100000 \
        2>"$W/prefer-$shape.log"
    echo "rc=$?"
    grep -E '^\{"loss"' "$W/prefer-$shape.log" | head -3
    tail -n 3 "$W/prefer-$shape.log"
    ours=$(grep '^prefer train stats:' "$W/prefer-$shape.log" | sed 's/^prefer train stats: //')
    # The same run's op breakdown (PREFER_PROFILE=1: every op timed on its own, so slower).
    rm -rf "$W/prof-$shape"
    PREFER_PROFILE=1 timeout 200 $G/bin/prefer train --device cuda --model "$m" --data "$W/rows.jsonl" \
        --output-dir "$W/prof-$shape" --per-device-train-batch-size 8 --max-steps 3 \
        --lora-r 16 --lora-alpha 16 --lora-dropout 0.05 --lora-target-modules "$TARGETS" \
        --max-length 1024 --learning-rate 1e-5 --logging-steps 1 --save-steps 100000 \
        2>"$W/prof-$shape.log"
    prof=$(grep '^prefer train stats:' "$W/prof-$shape.log" | sed 's/^prefer train stats: //')
    # Both sides again without gradient checkpointing (activations kept: faster, more memory).
    rm -rf "$W/nogc-$shape"
    timeout 200 $G/bin/prefer train --device cuda --model "$m" --data "$W/rows.jsonl" \
        --output-dir "$W/nogc-$shape" --per-device-train-batch-size 8 --max-steps "$STEPS" \
        --lora-r 16 --lora-alpha 16 --lora-dropout 0.05 --lora-target-modules "$TARGETS" \
        --max-length 1024 --learning-rate 1e-5 --logging-steps 1 --save-steps 100000 \
        --gradient-checkpointing false 2>"$W/nogc-$shape.log"
    nogc=$(grep '^prefer train stats:' "$W/nogc-$shape.log" | sed 's/^prefer train stats: //')
    trl_nogc=$(timeout 300 python3 bench/gpu/dpo_trl.py "$m" "$W/rows.jsonl" --batch 8 --steps "$STEPS" \
        --max-length 1024 --targets "$TARGETS" --no-gradient-checkpointing 2>"$W/trl-nogc-$shape.log" | tail -n 1)
    echo "== $shape: TRL + PEFT"
    trl=$(timeout 400 python3 bench/gpu/dpo_trl.py "$m" "$W/rows.jsonl" --batch 8 --steps "$STEPS" \
        --max-length 1024 --targets "$TARGETS" 2>"$W/trl-$shape.log" | tail -n 1)
    echo "rc=$?"; tail -n 3 "$W/trl-$shape.log"
    echo "{\"shape\": \"$shape\", \"prefer\": ${ours:-null}, \"trl\": ${trl:-null}, \"prefer_profiled\": ${prof:-null}, \"prefer_no_gc\": ${nogc:-null}, \"trl_no_gc\": ${trl_nogc:-null}}" | tee -a "$OUT/train.json"
done
