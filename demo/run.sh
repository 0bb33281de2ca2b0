#!/usr/bin/env bash
# The main job on the bundled tiny model (random weights, so its answers are noise) and demo data:
# sample a rejected answer per instruction with the reference workflow's Korean template and
# sampling settings, build preference pairs (chosen = gold output), and score the chosen side
# under the model (DPO's reference pass). Outputs land in demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p prefer
prefer=target/release/prefer
model=fixtures/models/gemma2-tiny
out=demo-out
rm -rf "$out" && mkdir -p "$out"

# 1. Sample: the reference workflow's settings (T=0.001 is raised to 0.01, as vLLM does).
"$prefer" sample --model "$model" --data demo/instructions.jsonl --template korean \
    --out "$out/samples.jsonl" --top-k 5 --top-p 0.8 --temperature 0.001 --max-tokens 48 \
    --stop '<|endoftext|>' --stop '</s>' --stop '<|im_end|>' --stop '<|end_of_text|>' --logprobs 0

# 2. Chosen side's reference log-probs (TRL appends EOS to chosen: --add-eos).
python3 - "$out" <<'PY' || { echo "python3 is needed to build the score input" >&2; exit 1; }
import json, sys
out = sys.argv[1]
tpl = "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n{}\n\n###답변:\n"
with open("demo/instructions.jsonl") as src, open(f"{out}/chosen.jsonl", "w") as dst:
    for line in src:
        row = json.loads(line)
        dst.write(json.dumps({"prompt": tpl.format(row["instruction"]), "completion": row["output"]}, ensure_ascii=False) + "\n")
PY
"$prefer" score --model "$model" --data "$out/chosen.jsonl" --out "$out/chosen-scores.jsonl" --add-eos

# 3. Pairs: chosen = gold output, rejected = the sample; a datasets-loadable folder. The tiny
#    random model never says EOS, so every sample hits --max-tokens: keep those here.
"$prefer" pairs --gold train=demo/instructions.jsonl --samples "$out/samples.jsonl" \
    --tokenizer "$model" --max-length 4096 --keep-truncated --chosen-logps "$out/chosen-scores.jsonl" --out "$out/pairs"

echo
echo "samples:  $out/samples.jsonl"
echo "pairs:    $out/pairs (load with datasets.load_dataset(\"$out/pairs\"))"
