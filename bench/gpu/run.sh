#!/usr/bin/env bash
# bench/gpu/run.sh — the GPU run of issue 3: CUDA tests, CLI parity, and `prefer score` on the
# GPU against HF transformers. Runs THERE (the GPU machine), from the repository root, with the
# .gpu/ folder that bench/gpu/prepare.sh built here carried along:
#
#     bash bench/gpu/run.sh            # results in $OUT (bench.json, bench.md, run.log, ...)
#
# Every step is tolerant (a failure is logged and the rest still run) and bounded: each has
# its own timeout, and no step starts once PREFER_BENCH_BUDGET_S seconds (default 480) have
# passed, so the whole run ends well inside the device tool's 10-minute limit. Random models
# are written in the background while the tests run.
#
# What comes back in $OUT (at most 8 files): run.log (this script's whole output), tests.log
# (the test binaries' full output), bench.json, bench.md, logs.tar.gz (every step's log and
# the raw measurements).
set -uo pipefail

START=$(date +%s)
BUDGET=${PREFER_BENCH_BUDGET_S:-480}
RESERVE_S=15
TAIL_LINES=30
# shellcheck source=bench/gpu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" || exit 1
OUT=${OUT:-/tmp/prefer-bench-out}
W=${PREFER_BENCH_WORK:-/tmp/prefer-bench}
mkdir -p "$OUT" "$W/logs" "$W/models"
: > "$W/steps.jsonl"
exec > >(tee -a "$OUT/run.log") 2>&1

G=.gpu
S=$G/scripts
PREFER=$G/bin/prefer
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
# Kernels compile once (NVRTC) and are shared by every process below through the disk cache.
export PREFER_CACHE_DIR=/tmp/prefer-kernels
echo "+ source $G/env.sh"
# shellcheck disable=SC1091
source "$G/env.sh"

echo "== prefer GPU run: $(date -u +%FT%TZ), budget ${BUDGET}s, OUT=$OUT, work=$W"
echo "+ nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
ls -la "$G" "$G/bin"
df -h /tmp | tail -1
free -g | head -2

# Random bf16 checkpoints, in the background (disk-bound; see make_model.py). PREFER_BENCH_SHAPES
# narrows the list (e.g. for a dry run without a GPU).
SHAPES=${PREFER_BENCH_SHAPES:-qwen05 llama1b gemma2b gemma9b}
gen_models() {
    local child=
    trap '[ -n "$child" ] && kill "$child" 2>/dev/null; exit 1' TERM
    for s in $SHAPES; do
        echo "+ make_model.py $s"
        python3 "$S/make_model.py" "$s" "$W/models/$s" &
        child=$!
        wait "$child" && touch "$W/models/$s.done"
    done
}
gen_models >"$W/logs/make-models.log" 2>&1 &
GEN_PID=$!

# 1. Correctness: the model's and the engine's GPU tests (every test binary prepare.sh found),
#    then the CLI on both devices.
for t in "$G"/bin/model-cuda_* "$G"/bin/engine-cuda_*; do
    [ -x "$t" ] || { echo "== MISSING $t"; continue; }
    name=$(basename "$t")
    limit=90
    [ "$name" = engine-cuda_parity ] && limit=120
    step "$name" "$limit" "$t" --include-ignored --nocapture --test-threads=1
done
step cli-parity 60 python3 "$S/check_score_cli.py" "$PREFER" --fixtures fixtures --work "$W/cli"

# 2. Speed: the same rows through transformers and prefer, one shape at a time.
declare -A VOCAB=([qwen05]=151936 [llama1b]=128256 [gemma2b]=256000 [gemma9b]=256000)
for s in qwen05 llama1b gemma2b; do
    [[ " $SHAPES " == *" $s "* ]] || continue
    wait_for "$W/models/$s.done" "$GEN_PID" || continue
    rows=$W/rows-$s.jsonl
    step "rows-$s" 60 python3 "$S/make_rows.py" --vocab "${VOCAB[$s]}" --rows 64 --seq 1024 \
        --prompt 1 "$rows" || continue
    step "hf-$s" 120 bash "$S/with_smi.sh" "$W/smi-hf-$s.txt" python3 "$S/score_hf.py" \
        "$W/models/$s" --data "$rows" --batch 8 --json-out "$W/hf-$s.json" \
        --dump "$W/hf-$s-logps.json"
    step "prefer-$s" 120 bash "$S/with_smi.sh" "$W/smi-prefer-$s.txt" "$PREFER" score \
        --model "$W/models/$s" --data "$rows" --out "$W/prefer-$s.jsonl" --device cuda \
        --warmup --profile
done

# 3. gemma9b shape, 32 rows × 4096 tokens: does it fit, and how fast.
if [[ " $SHAPES " == *" gemma9b "* ]] && wait_for "$W/models/gemma9b.done" "$GEN_PID"; then
    rows=$W/rows-gemma9b.jsonl
    step rows-gemma9b 60 python3 "$S/make_rows.py" --vocab 256000 --rows 32 --seq 4096 \
        --prompt 1 "$rows" &&
        step prefer-gemma9b 150 bash "$S/with_smi.sh" "$W/smi-prefer-gemma9b.txt" "$PREFER" score \
            --model "$W/models/gemma9b" --data "$rows" --out "$W/prefer-gemma9b.jsonl" \
            --device cuda --warmup --profile
fi
rm -rf "$W/models/gemma9b"

# 4. If time is left: prefer at transformers' batch size (8 rows = 8192 tokens a forward),
#    for its peak memory; then the engine's kernel micro-benchmarks.
for s in qwen05 llama1b gemma2b; do
    [ -e "$W/models/$s.done" ] || continue
    step "prefer8k-$s" 60 bash "$S/with_smi.sh" "$W/smi-prefer8k-$s.txt" "$PREFER" score \
        --model "$W/models/$s" --data "$W/rows-$s.jsonl" --out "$W/prefer8k-$s.jsonl" \
        --device cuda --batch-tokens 8192 --warmup --stats
done
if [ -x "$G/bin/cuda_bench" ]; then
    step cuda_bench 90 "$G/bin/cuda_bench" --quick
fi

# 5. Results.
kill "$GEN_PID" 2>/dev/null
echo "== summary at +$(elapsed)s"
python3 "$S/summarize.py" "$W" "$OUT" || echo "== summarize failed"
{
    for f in "$W"/logs/*-cuda_*.log "$W/logs/cli-parity.log"; do
        echo "=================== $(basename "$f" .log)"
        cat "$f" 2>/dev/null
    done
} >"$OUT/tests.log"
(cd "$W" && tar czf "$OUT/logs.tar.gz" logs steps.jsonl $(ls hf-*.json smi-*.txt 2>/dev/null | grep -v logps))
ls -la "$OUT"
echo "== done in $(elapsed)s"
