#!/usr/bin/env bash
# bench/gpu/gen.sh — issue 4's generation benchmark: `prefer sample --device cuda` beside HF
# transformers `generate` on the same prompts, on one H200. Runs THERE (the GPU machine), from
# the repository root, with .gpu/ (bench/gpu/prepare.sh: .gpu/bin/prefer, .gpu/env.sh) carried:
#
#     bash bench/gpu/gen.sh            # results in $OUT: gen.json, gen.md, gen.log, gen-logs.tar.gz
#
# Workloads (random-weight bf16 models of GUIDE §5's shapes, prompts of random token ids,
# EOS ignored, top_k 5, top_p 0.8, temperature 0.7):
#   uniform  llama1b, qwen05: 256 prompts × 128 in / 128 out
#   mixed    llama1b, qwen05: 1,024 prompts, lengths drawn uniformly in 32–512 in / 32–512 out
#            (each row's own max_tokens)
#   gemma9b  1,024 prompts × 256 in / 256 out (prefer only)
# HF baseline: the uniform workload as one batch of 256; the mixed workload batched by length
# buckets of 128 rows, of which only 2 (spread over the buckets) are timed and the rest
# extrapolated — labelled so in the results.
#
# prefer writes a per-step trace (PREFER_STEP_TRACE: batch size, new tokens, context tokens,
# host enqueue / GPU wait / logits copy ms); the summary turns it into the decode limit: the
# sum over decode steps of max(bytes read / 4.3e12, FLOPs / 790e12), each step reading every
# weight once and every active sequence's KV, FLOPs = 2·params·tokens + 4·L·H·D·context.
#
# Every step is logged and bounded (its own timeout, capped by what is left of
# PREFER_GEN_BUDGET_S, default 300 s; up to ~540 fits the device tool's 10 minutes); a
# failure is recorded and the rest still run.
# PREFER_GEN_FLAGS adds flags to every prefer run (e.g. "--max-num-seqs 512");
# PREFER_PAGED_KV=gather switches the layers to the gathered-copy attention path.
# The uniform runs are repeated with PREFER_CUDA_GRAPHS=0 (decode steps launched kernel by
# kernel instead of as CUDA graphs), named *-eager-uniform; llama1b-profile-uniform times every
# op of its decode steps (PREFER_PROFILE=1).
set -uo pipefail

START=$(date +%s)
BUDGET=${PREFER_GEN_BUDGET_S:-300}
RESERVE_S=10
TAIL_LINES=15
# shellcheck source=bench/gpu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" || exit 1
OUT=${OUT:-/tmp/prefer-gen-out}
W=${PREFER_GEN_WORK:-/tmp/prefer-gen}
mkdir -p "$OUT" "$W/logs" "$W/models" "$W/data"
: >"$W/steps.jsonl"
exec > >(tee -a "$OUT/gen.log") 2>&1

G=.gpu
PREFER=$G/bin/prefer
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
export PREFER_CACHE_DIR=/tmp/prefer-kernels
echo "+ source $G/env.sh"
# shellcheck disable=SC1091
source "$G/env.sh" || echo "== no $G/env.sh: libraries must be on the default paths"

echo "== prefer generation benchmark: $(date -u +%FT%TZ), budget ${BUDGET}s, OUT=$OUT, work=$W"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
ls -la "$G/bin" || echo "== no $G/bin: run bench/gpu/prepare.sh on the CPU machine first"

# Random models in the background, smallest first; each gets the fixture tokenizer (ids
# beyond its vocabulary decode to nothing) and is marked done only when complete.
SHAPES=${PREFER_GEN_SHAPES:-"llama1b qwen05 gemma9b"}
(
    for s in $SHAPES; do
        d=$W/models/$s
        echo "+ make_model.py $s"
        python3 bench/gpu/make_model.py "$s" "$d" &&
            cp fixtures/tokenizer/tokenizer.json fixtures/tokenizer/tokenizer_config.json \
                fixtures/tokenizer/special_tokens_map.json "$d/" &&
            touch "$d/.done"
    done
) >"$W/logs/make-models.log" 2>&1 &
MK_PID=$!

# Prompt files (random ids in [3, 1000): valid for every shape's vocabulary).
python3 - "$W/data" <<'EOF'
import json, random, sys
d = sys.argv[1]
def write(name, rows):
    with open(f"{d}/{name}.jsonl", "w") as f:
        for i, (n_in, n_out) in enumerate(rows):
            rng = random.Random(i * 7919 + len(rows))
            f.write(json.dumps({"id": i, "prompt_ids": [rng.randrange(3, 1000) for _ in range(n_in)],
                                "max_tokens": n_out}) + "\n")
write("uniform", [(128, 128)] * 256)
rng = random.Random(4)
write("mixed", [(rng.randint(32, 512), rng.randint(32, 512)) for _ in range(1024)])
write("gemma", [(256, 256)] * 1024)
print("prompts:", {n: sum(1 for _ in open(f"{d}/{n}.jsonl")) for n in ("uniform", "mixed", "gemma")})
EOF

# Kernels compile once (NVRTC → disk cache) before anything is timed.
step kernels 120 "$PREFER" kernels

# The sample crate's GPU tests, when prepare.sh built them (cargo test --release --no-run
# -p sample --test gpu_generation → .gpu/bin/sample-gpu_generation): HF greedy parity within
# the margins on the nine fixtures, paged vs contiguous logits, the memory plan. They run
# while the random models are still being written.
if [ -x "$G/bin/sample-gpu_generation" ]; then
    export PREFER_FIXTURES=$PWD/fixtures
    step sample-gpu-tests 120 \
        "$G/bin/sample-gpu_generation" --include-ignored --test-threads=1 --nocapture
    cp "$W/logs/sample-gpu-tests.log" "$OUT/sample-gpu-tests.log" 2>/dev/null
else
    echo "== no $G/bin/sample-gpu_generation: the sample crate's GPU tests are not run"
fi

# prefer_run NAME SHAPE DATA: one `prefer sample` on the GPU with its step trace.
prefer_run() {
    local name=$1 shape=$2 data=$3 limit=$4
    wait_for "$W/models/$shape/.done" "$MK_PID" || return 1
    rm -f "$W/out-$name.jsonl"
    export PREFER_STEP_TRACE=$W/trace-$name.tsv
    # shellcheck disable=SC2086
    step "prefer-$name" "$limit" \
        "$PREFER" sample --model "$W/models/$shape" --data "$W/data/$data.jsonl" \
        --out "$W/out-$name.jsonl" --device cuda --ignore-eos --top-k 5 --top-p 0.8 \
        --temperature 0.7 --seed 0 ${PREFER_GEN_FLAGS:-}
    local rc=$?
    unset PREFER_STEP_TRACE
    return $rc
}

# hf_run NAME SHAPE DATA BATCH MAX_BATCHES
hf_run() {
    local name=$1 shape=$2 data=$3 batch=$4 maxb=$5 limit=$6
    wait_for "$W/models/$shape/.done" "$MK_PID" || return 1
    step "hf-$name" "$limit" python3 bench/gen_hf.py "$W/models/$shape" \
        --prompts "$W/data/$data.jsonl" --batch "$batch" --max-batches "$maxb" \
        --json-out "$W/hf-$name.json"
}

# The uniform workload of both shapes first (the issue's headline comparison), then the
# mixed one, then gemma9b: what the budget cuts is the least important.
for s in llama1b qwen05; do
    case " $SHAPES " in *" $s "*) ;; *) continue ;; esac
    prefer_run "$s-uniform" "$s" uniform 60
    hf_run "$s-uniform" "$s" uniform 256 0 60
done
# The same uniform runs with CUDA graphs off: what the graphs save.
for s in llama1b qwen05; do
    case " $SHAPES " in *" $s "*) ;; *) continue ;; esac
    PREFER_CUDA_GRAPHS=0 prefer_run "$s-eager-uniform" "$s" uniform 60
done
# Where a decode step's GPU time goes (each op timed alone: slower than a real run).
case " $SHAPES " in *" llama1b "*) PREFER_PROFILE=1 prefer_run llama1b-profile-uniform llama1b uniform 90 ;; esac
for s in llama1b qwen05; do
    case " $SHAPES " in *" $s "*) ;; *) continue ;; esac
    prefer_run "$s-mixed" "$s" mixed 150
    hf_run "$s-mixed" "$s" mixed 128 2 75
done
case " $SHAPES " in *" gemma9b "*) prefer_run gemma9b gemma9b gemma "${PREFER_GEMMA_LIMIT_S:-150}" ;; esac

# The model writer (and the make_model.py it is running, if any) is no longer needed.
pkill -P "$MK_PID" 2>/dev/null
kill "$MK_PID" 2>/dev/null
echo "== summary at +$(elapsed)s"
python3 - "$W" "$OUT" <<'EOF' || echo "== summary failed"
import json, os, re, sys
sys.path.insert(0, "tools")
from make_random_model import SHAPES, tensor_shapes

W, OUT = sys.argv[1], sys.argv[2]
BW, PEAK = 4.3e12, 790e12

def params_of(shape):
    n = 0
    for shp in tensor_shapes(dict(SHAPES[shape])).values():
        k = 1
        for x in shp:
            k *= x
        n += k
    return n

def read_json(path):
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None

def prefer_result(name):
    """tokens, seconds from prefer's `wrote N rows ... T tokens in S s` line, + its other lines."""
    r = {}
    try:
        text = open(f"{W}/logs/prefer-{name}.log", errors="replace").read()
    except OSError:
        return None
    m = re.search(r"wrote (\d+) rows to .*?: (\d+) tokens in ([\d.]+) s \((\d+) tokens/s\), (\d+) preemptions", text)
    if m:
        r.update(rows=int(m[1]), output_tokens=int(m[2]), seconds=float(m[3]),
                 output_tokens_per_s=int(m[4]), preemptions=int(m[5]))
    for key, pat in [("kv_cache", r"KV cache: .*"), ("gpu_memory", r"GPU memory: .*"),
                     ("runner_times", r"\d+ model steps on .*")]:
        m = re.search(pat, text)
        if m:
            r[key] = m[0]
    if "output_tokens" not in r:
        r["error"] = text.strip().splitlines()[-1][:400] if text.strip() else "no output"
    return r

def check_lengths(name):
    """Rows whose token_ids length is not the row's max_tokens (EOS was ignored)."""
    want = {}
    data = {"uniform": "uniform", "mixed": "mixed"}.get(name.split("-")[-1], "gemma")
    for line in open(f"{W}/data/{data}.jsonl"):
        r = json.loads(line)
        want[str(r["id"])] = r["max_tokens"]
    bad = n = 0
    try:
        for line in open(f"{W}/out-{name}.jsonl"):
            r = json.loads(line)
            n += 1
            bad += len(r["token_ids"]) != want.get(r["id"], -1)
    except (OSError, ValueError):
        return None
    return {"rows": n, "wrong_length": bad}

def trace_stats(name, shape):
    path = f"{W}/trace-{name}.tsv"
    try:
        lines = open(path).read().strip().splitlines()
    except OSError:
        return None
    cfg = SHAPES[shape]
    P = params_of(shape)
    L, H, Hkv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    wbytes, kv_tok = 2 * P, 2 * L * Hkv * D * 2
    s = dict(steps=0, decode_steps=0, limit_decode_s=0.0, limit_all_s=0.0, step_s=0.0,
             decode_step_s=0.0, enqueue_s=0.0, wait_s=0.0, copy_s=0.0, decode_enqueue_s=0.0,
             decode_wait_s=0.0, max_batch=0, bytes_decode=0.0)
    for line in lines:
        # Skip anything that is not a whole data line: a (repeated) header, a blank line, or
        # the partial last line of a run killed by its step limit.
        fields = line.split("\t")
        if len(fields) != 6:
            continue
        try:
            seqs, q, kv = (int(x) for x in fields[:3])
            enq, wait, copy = (float(x) / 1e3 for x in fields[3:])
        except ValueError:
            continue
        bytes_ = wbytes + kv * kv_tok
        flops = 2 * P * q + 4 * L * H * D * kv
        lim = max(bytes_ / BW, flops / PEAK)
        s["steps"] += 1
        s["limit_all_s"] += lim
        s["step_s"] += enq + wait + copy
        s["enqueue_s"] += enq
        s["wait_s"] += wait
        s["copy_s"] += copy
        s["max_batch"] = max(s["max_batch"], seqs)
        if q == seqs:
            s["decode_steps"] += 1
            s["limit_decode_s"] += lim
            s["decode_step_s"] += enq + wait + copy
            s["decode_enqueue_s"] += enq
            s["decode_wait_s"] += wait
            s["bytes_decode"] += bytes_
    s["params"] = P
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}

runs = {}
for name, shape in [("llama1b-uniform", "llama1b"), ("llama1b-eager-uniform", "llama1b"),
                    ("qwen05-eager-uniform", "qwen05"), ("llama1b-profile-uniform", "llama1b"),
                    ("llama1b-mixed", "llama1b"),
                    ("qwen05-uniform", "qwen05"), ("qwen05-mixed", "qwen05"), ("gemma9b", "gemma9b")]:
    r = {"shape": shape, "prefer": prefer_result(name), "trace": trace_stats(name, shape),
         "lengths": check_lengths(name), "hf": read_json(f"{W}/hf-{name}.json")}
    p, t, hf = r["prefer"], r["trace"], r["hf"]
    if p and "seconds" in p and t:
        r["decode_limit_ratio"] = round(t["limit_decode_s"] / p["seconds"], 4)
        r["step_roofline_ratio"] = round(t["limit_all_s"] / p["seconds"], 4)
        r["decode_steps_vs_limit"] = round(t["limit_decode_s"] / max(t["decode_step_s"], 1e-9), 4)
        r["host_outside_model_s"] = round(p["seconds"] - t["step_s"], 3)
    if p and "output_tokens_per_s" in p and hf:
        r["speedup_vs_hf"] = round(p["output_tokens_per_s"] / hf["output_tokens_per_s"], 2)
    runs[name] = r

steps = [json.loads(l) for l in open(f"{W}/steps.jsonl")]
json.dump({"runs": runs, "steps": steps}, open(f"{OUT}/gen.json", "w"), indent=1)

md = ["# prefer sample --device cuda vs HF generate (H200, random bf16 weights)", "",
      "top_k 5, top_p 0.8, T 0.7, EOS ignored. tokens/s = output tokens / generation wall time "
      "(model load excluded for both). HF mixed: 2 length-bucket batches of 128 timed, the rest "
      "extrapolated from their tokens/s (marked *).", "",
      "| run | prefer tok/s | HF tok/s | × HF | decode limit s | prefer s | limit / wall | "
      "limit / decode-step time | decode steps | enqueue ms/step | GPU wait ms/step | copy ms/step | host outside model s | rows ok |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for name, r in runs.items():
    p, t, hf, ln = r["prefer"] or {}, r["trace"] or {}, r["hf"] or {}, r["lengths"] or {}
    n = max(t.get("steps", 0), 1)
    cell = lambda v, f="{}": f.format(v) if v is not None else "–"
    md.append("| " + " | ".join([
        name,
        cell(p.get("output_tokens_per_s")),
        cell(hf.get("output_tokens_per_s")) + ("*" if hf.get("extrapolated") else ""),
        cell(r.get("speedup_vs_hf")),
        cell(t.get("limit_decode_s"), "{:.3f}"),
        cell(p.get("seconds")),
        cell(r.get("decode_limit_ratio"), "{:.1%}"),
        cell(r.get("decode_steps_vs_limit"), "{:.1%}"),
        cell(t.get("decode_steps")),
        cell(t.get("enqueue_s", 0) * 1e3 / n if t else None, "{:.2f}"),
        cell(t.get("wait_s", 0) * 1e3 / n if t else None, "{:.2f}"),
        cell(t.get("copy_s", 0) * 1e3 / n if t else None, "{:.2f}"),
        cell(r.get("host_outside_model_s")),
        f"{ln.get('rows', '–')} ({ln.get('wrong_length', '–')} wrong length)" if ln else "–",
    ]) + " |")
md += ["", "Per run (prefer's own lines):", ""]
for name, r in runs.items():
    p = r["prefer"] or {}
    md.append(f"- {name}: " + "; ".join(str(p[k]) for k in ("gpu_memory", "kv_cache", "runner_times", "error") if k in p))
md += ["", "Steps: " + ", ".join(f"{s['step']}={s.get('rc', s.get('status'))}" for s in steps)]
open(f"{OUT}/gen.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
(cd "$W" && tar czf "$OUT/gen-logs.tar.gz" logs steps.jsonl trace-*.tsv hf-*.json 2>/dev/null)
ls -la "$OUT"
echo "== done in $(elapsed)s"
