#!/usr/bin/env python3
"""Collect what bench/gpu/run.sh measured into bench.json and a human table, bench.md.

    python3 bench/gpu/summarize.py WORK_DIR OUT_DIR

Reads, per shape S: WORK/hf-S.json (bench/score_hf.py's line), the `prefer score stats:` line
of WORK/logs/prefer-S.log (and prefer8k-S.log: the same rows with --batch-tokens 8192),
nvidia-smi samples WORK/smi-*.txt, and the per-token log-probs of both (WORK/hf-S-logps.json,
WORK/prefer-S.jsonl) for a cross-check; plus WORK/steps.jsonl (each step's exit status).
Anything missing is reported as missing, never fatal.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_random_model import SHAPES, tensor_shapes  # noqa: E402

PEAK = 790e12
TARGETS = {"qwen05": 1.5, "llama1b": 1.2, "gemma2b": 1.5}
GIB = 2**30


def params_of(shape):
    n = 0
    for shp in tensor_shapes(dict(SHAPES[shape])).values():
        k = 1
        for d in shp:
            k *= d
        n += k
    return n


def read_json(path):
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def prefer_stats(log):
    try:
        with open(log, errors="replace") as f:
            for line in f:
                if line.startswith("prefer score stats: "):
                    return json.loads(line[len("prefer score stats: "):])
    except (OSError, ValueError):
        pass
    return None


def last_error(log):
    """The last few lines of a failed step's log, for the record."""
    try:
        with open(log, errors="replace") as f:
            return "".join(f.readlines()[-6:]).strip()
    except OSError:
        return "no log"


def smi_peak_mib(path):
    """Peak used MiB while the command ran, minus what was in use before it started."""
    try:
        with open(path) as f:
            vals = [float(x) for x in f.read().split() if x.replace(".", "", 1).isdigit()]
    except OSError:
        return None
    if len(vals) < 2:
        return None
    return max(vals) - vals[0]


def logp_diff(hf_dump, prefer_out):
    """Mean / max |prefer − HF| over every scored token (same rows, same order)."""
    try:
        with open(hf_dump) as f:
            hf = json.load(f)
        with open(prefer_out) as f:
            pr = [json.loads(line)["token_logps"] for line in f]
    except (OSError, ValueError, KeyError):
        return None
    if len(hf) != len(pr):
        return {"error": f"{len(hf)} HF rows vs {len(pr)} prefer rows"}
    errs = [abs(a - b) for h, p in zip(hf, pr) for a, b in zip(h, p)]
    if not errs:
        return None
    return {"tokens": len(errs), "mean_abs": sum(errs) / len(errs), "max_abs": max(errs)}


def prefer_entry(work, name, params):
    stats = prefer_stats(os.path.join(work, "logs", f"{name}.log"))
    if stats is None:
        return {"error": last_error(os.path.join(work, "logs", f"{name}.log"))}
    entry = dict(stats)
    seconds = stats.get("timed_s") or stats.get("score_s") or 0
    entry["mfu"] = 2 * params * stats["tokens"] / seconds / PEAK if seconds else None
    for k in ("peak_live_bytes", "peak_reserved_bytes", "weights_bytes"):
        if isinstance(stats.get(k), (int, float)):
            entry[k.replace("_bytes", "_gib")] = stats[k] / GIB
    entry["smi_peak_gib"] = (lambda m: m / 1024 if m is not None else None)(
        smi_peak_mib(os.path.join(work, f"smi-{name}.txt")))
    prof = stats.get("profile") or {}
    if prof:
        ops = prof.get("ops", {})
        entry["gemm_share_of_ops"] = prof.get("gemm_share_of_ops")
        entry["gemm_share_of_wall"] = prof.get("gemm_share_of_wall")
        entry["lm_head_share_of_ops"] = (ops.get("lm_head_logprobs", {}).get("ms", 0)
                                         / max(prof.get("ops_total_ms", 0), 1e-9))
    return entry


def fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def main():
    work, out = sys.argv[1], sys.argv[2]
    steps = []
    try:
        with open(os.path.join(work, "steps.jsonl")) as f:
            steps = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    result = {"steps": steps, "score": {}, "peak_tflops": PEAK / 1e12}
    for shape in ("qwen05", "llama1b", "gemma2b"):
        params = params_of(shape)
        hf = read_json(os.path.join(work, f"hf-{shape}.json"))
        if hf is not None:
            smi = smi_peak_mib(os.path.join(work, f"smi-hf-{shape}.txt"))
            hf["smi_peak_gib"] = smi / 1024 if smi is not None else None
        else:
            hf = {"error": last_error(os.path.join(work, "logs", f"hf-{shape}.log"))}
        pr = prefer_entry(work, f"prefer-{shape}", params)
        pr8k = prefer_entry(work, f"prefer8k-{shape}", params)
        entry = {"params": params, "transformers": hf, "prefer": pr, "prefer_batch8k": pr8k,
                 "target_speedup": TARGETS[shape]}
        if hf.get("tokens_per_s") and pr.get("tokens_per_s"):
            entry["speedup"] = pr["tokens_per_s"] / hf["tokens_per_s"]
        if hf.get("tokens_per_s") and pr8k.get("tokens_per_s"):
            entry["speedup_batch8k"] = pr8k["tokens_per_s"] / hf["tokens_per_s"]
        entry["logp_vs_transformers"] = logp_diff(os.path.join(work, f"hf-{shape}-logps.json"),
                                                  os.path.join(work, f"prefer-{shape}.jsonl"))
        result["score"][shape] = entry
    g9 = prefer_entry(work, "prefer-gemma9b", params_of("gemma9b"))
    g9["fits"] = "tokens_per_s" in g9
    result["gemma9b_32x4096"] = g9
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)

    md = ["# prefer score on the GPU vs transformers (sdpa, bf16, log_softmax + gather)", "",
          "64 rows × 1024 tokens (prompt 1 + completion 1023: both score 1023 positions a row), "
          "random bf16 weights. transformers: batch 8, one warm-up pass then one timed pass. "
          "prefer: `--device cuda --warmup --profile` (default budget 65536 tokens a forward; "
          "the 8k column is `--batch-tokens 8192`). MFU = 2·params·tokens/s/790 TFLOP/s.", "",
          "| shape | params | HF tok/s | prefer tok/s | speedup (target) | prefer 8k tok/s | HF MFU | "
          "prefer MFU | HF peak GiB alloc / smi | prefer peak GiB live / reserved / smi | "
          "prefer 8k peak live | GEMM share (ops / wall) | lm_head share | Δlogp vs HF (abs mean / max) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, e in result["score"].items():
        hf, pr, p8 = e["transformers"], e["prefer"], e["prefer_batch8k"]
        d = e.get("logp_vs_transformers") or {}
        md.append(
            f"| {shape} | {e['params'] / 1e9:.2f}B | {fmt(hf.get('tokens_per_s'), ',.0f')} | "
            f"{fmt(pr.get('tokens_per_s'), ',.0f')} | {fmt(e.get('speedup'))}× ({e['target_speedup']}×) | "
            f"{fmt(p8.get('tokens_per_s'), ',.0f')} | {fmt(hf.get('mfu'), '.1%')} | {fmt(pr.get('mfu'), '.1%')} | "
            f"{fmt(hf.get('peak_gib'))} / {fmt(hf.get('smi_peak_gib'))} | "
            f"{fmt(pr.get('peak_live_gib'))} / {fmt(pr.get('peak_reserved_gib'))} / {fmt(pr.get('smi_peak_gib'))} | "
            f"{fmt(p8.get('peak_live_gib'))} | "
            f"{fmt(pr.get('gemm_share_of_ops'), '.0%')} / {fmt(pr.get('gemm_share_of_wall'), '.0%')} | "
            f"{fmt(pr.get('lm_head_share_of_ops'), '.0%')} | "
            f"{fmt(d.get('mean_abs'), '.1e')} / {fmt(d.get('max_abs'), '.1e')} |")
    md += ["", "## gemma9b shape, 32 rows × 4096 tokens (prefer only)", ""]
    if g9["fits"]:
        md.append(f"fits: yes — {g9['tokens_per_s']:,.0f} tokens/s, MFU {fmt(g9.get('mfu'), '.1%')}, "
                  f"peak live {fmt(g9.get('peak_live_gib'))} GiB (reserved {fmt(g9.get('peak_reserved_gib'))}, "
                  f"smi {fmt(g9.get('smi_peak_gib'))}), {g9.get('batches')} batches of ≤ "
                  f"{g9.get('batch_tokens')} tokens, GEMM share {fmt(g9.get('gemm_share_of_ops'), '.0%')}.")
    elif g9.get("error") == "no log":
        md.append("not run")
    else:
        md += ["did not complete:", "```", g9.get("error", "no stats"), "```"]
    md += ["", "## steps", "", "| step | rc | seconds |", "|---|---|---|"]
    for s in steps:
        md.append(f"| {s.get('step')} | {s.get('rc', s.get('status'))} | {fmt(s.get('seconds'), '.1f')} |")
    for shape, e in result["score"].items():
        for side in ("transformers", "prefer", "prefer_batch8k"):
            if "error" in e[side] and e[side]["error"] != "no log":
                md += ["", f"{shape} {side} failed:", "```", e[side]["error"], "```"]
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
