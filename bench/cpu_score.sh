#!/usr/bin/env bash
# CPU benchmark of `prefer score` (issue 2): tokens/s on the bundled tiny model and on a random
# ~100M-parameter llama, plus the CPU GEMM rate against the machine's measured peak.
#   bash bench/cpu_score.sh            (from the repo root; needs python3 with numpy)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${BENCH_DIR:-/tmp/prefer-bench}
mkdir -p "$work"
cargo build --release -q -p prefer
cargo build --release -q -p engine --example gemm_peak
prefer=target/release/prefer

python3 tools/make_random_model.py llama100m "$work/llama100m" --dtype bf16 --tokenizer fixtures/tokenizer
python3 - "$work" <<'PY'
import json, random, sys
work = sys.argv[1]
random.seed(0)
def rows(path, n, length, vocab):
    with open(path, "w") as f:
        for _ in range(n):
            ids = [random.randrange(3, vocab) for _ in range(length)]
            half = length // 2
            f.write(json.dumps({"prompt_ids": ids[:half], "completion_ids": ids[half:]}) + "\n")
rows(f"{work}/rows-100m.jsonl", 16, 512, 32000)
rows(f"{work}/rows-tiny.jsonl", 256, 256, 1003)
PY

run() { # name model rows
  local start end tokens
  tokens=$(python3 -c "import json,sys; print(sum(len(r['prompt_ids'])+len(r['completion_ids']) for r in map(json.loads, open(sys.argv[1]))))" "$3")
  start=$(date +%s.%N)
  "$prefer" score --model "$2" --data "$3" --out "$work/out-$1.jsonl" 2>/dev/null
  end=$(date +%s.%N)
  python3 -c "t=$end-$start; print(f'$1: {$tokens} tokens in {t:.2f} s = {$tokens/t:,.0f} tokens/s')"
}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run gemma2-tiny fixtures/models/gemma2-tiny "$work/rows-tiny.jsonl"
run llama100m "$work/llama100m" "$work/rows-100m.jsonl"
target/release/examples/gemm_peak
