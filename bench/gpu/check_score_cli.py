#!/usr/bin/env python3
"""`prefer score --device cuda` against `--device cpu` on every fixture model, through the CLI.

For each model in fixtures/models: the reference's text rows and its sequences (as id rows
split in half) are scored on the CPU (f32) and on the GPU (bf16, once with the default batch
budget and once with --batch-tokens 7, which forces many batches). The outputs must have the
same rows with the same fields in the same order, and the log-probs must agree within a
per-model bound scaled by HF transformers' own bf16 error (fixtures/reference/<name>.bf16.json,
written by tools/gen_bf16_reference.py; the rule of crates/model/tests/cuda_parity.rs):

- mean |GPU − CPU| over a run's tokens <= max(2e-2, 1.25 x HF bf16's mean |bf16 − f32| over
  the same tokens);
- every token's |GPU − CPU| <= max(2e-2, 1.5 x HF bf16's largest |bf16 − f32| over all of the
  model's reference tokens: sequences, text rows, greedy decode).

Why: these fixtures have large, peaked logits, and transformers itself in bf16 misses a fixed
2e-2 per token on all nine (measured); its bf16 is the baseline a user compares with.
Where HF's own error is below 2e-2, 2e-2 stands. Prints ours and HF's numbers per model; exits
1 on any failure.

    python3 bench/gpu/check_score_cli.py PREFER_BINARY [--fixtures fixtures] [--work DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

TOL = 2e-2  # the bound: the floor of every bound here
MEAN_FACTOR = 1.25
MAX_FACTOR = 1.5


def rows_for(reference, bf16):
    """The rows to score, each with HF bf16's |bf16 − f32| on its completion tokens."""
    rows = []
    for i, (t, b) in enumerate(zip(reference["text"], bf16["text"])):
        if not t["add_eos"]:
            hf = [abs(x - y) for x, y in zip(b["completion_logprobs"], t["completion_logprobs"])]
            rows.append(({"prompt": t["prompt"], "completion": t["completion"], "tag": f"text{i}"}, hf))
    for i, (s, b) in enumerate(zip(reference["sequences"], bf16["sequences"])):
        ids = s["ids"]
        if len(ids) >= 2:
            half = max(1, len(ids) // 2)
            # logprobs[t] is log p(ids[t+1] | ids[..=t]): the completion ids[half:] are t >= half-1.
            hf = [abs(x - y) for x, y in zip(b["logprobs"][half - 1:], s["logprobs"][half - 1:])]
            rows.append(({"tag": f"seq{i}", "prompt_ids": ids[:half], "completion_ids": ids[half:]}, hf))
    return rows


def hf_pooled_max(reference, bf16):
    """HF bf16's largest log-prob error on any of the model's reference tokens."""
    errs = [abs(x - y) for s, b in zip(reference["sequences"], bf16["sequences"])
            for x, y in zip(b["logprobs"], s["logprobs"])]
    errs += [abs(x - y) for t, b in zip(reference["text"], bf16["text"])
             for x, y in zip(b["completion_logprobs"], t["completion_logprobs"])]
    errs += [abs(x - y) for g in bf16["greedy"] for x, y in zip(g["logprobs"], g["f32_logprobs"])]
    return max(errs)


def score(prefer, model, data, out, extra):
    cmd = [prefer, "score", "--model", model, "--data", data, "--out", out] + extra
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(out) as f:
        return [json.loads(line) for line in f]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefer")
    ap.add_argument("--fixtures", default="fixtures")
    ap.add_argument("--work", default=tempfile.mkdtemp(prefix="prefer-cli-check-"))
    ap.add_argument("--gpu", default="cuda", help="the device under test (cpu for a dry run here)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    failures = []
    models = sorted(os.listdir(os.path.join(args.fixtures, "models")))
    for name in models:
        model = os.path.join(args.fixtures, "models", name)
        with open(os.path.join(args.fixtures, "reference", name + ".json")) as f:
            reference = json.load(f)
        with open(os.path.join(args.fixtures, "reference", name + ".bf16.json")) as f:
            bf16 = json.load(f)
        rows = rows_for(reference, bf16)
        hf_max = hf_pooled_max(reference, bf16)
        max_bound = max(TOL, MAX_FACTOR * hf_max)
        data = os.path.join(args.work, name + ".jsonl")
        with open(data, "w") as f:
            for r, _ in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        try:
            cpu = score(args.prefer, model, data, os.path.join(args.work, name + "-cpu.jsonl"),
                        ["--device", "cpu"])
            runs = {
                args.gpu: score(args.prefer, model, data, os.path.join(args.work, name + "-gpu.jsonl"),
                                ["--device", args.gpu]),
                args.gpu + " --batch-tokens 7": score(
                    args.prefer, model, data, os.path.join(args.work, name + "-gpu7.jsonl"),
                    ["--device", args.gpu, "--batch-tokens", "7"]),
            }
        except RuntimeError as e:
            failures.append(f"{name}: {e}")
            print(f"{name}: FAILED to run: {e}", flush=True)
            continue
        for label, gpu in runs.items():
            errs, hf_errs = [], []
            if len(gpu) != len(cpu) or len(cpu) != len(rows):
                failures.append(f"{name} {label}: {len(gpu)} rows, CPU {len(cpu)}, input {len(rows)}")
                continue
            for g, c, (_, hf) in zip(gpu, cpu, rows):
                if list(g.keys()) != list(c.keys()):
                    failures.append(f"{name} {label} {c['tag']}: fields {list(g)} vs {list(c)}")
                if len(g["token_logps"]) != len(c["token_logps"]):
                    failures.append(f"{name} {label} {c['tag']}: token count differs")
                    continue
                # HF's error must be measured on these very tokens, or it is no scale for them.
                if len(c["token_logps"]) != len(hf):
                    failures.append(f"{name} {label} {c['tag']}: {len(c['token_logps'])} tokens, "
                                    f"the reference has {len(hf)}")
                    continue
                hf_errs += hf
                for i, (a, b) in enumerate(zip(g["token_logps"], c["token_logps"])):
                    e = abs(a - b)
                    errs.append(e)
                    if not e <= max_bound:  # NaN fails too
                        failures.append(f"{name} {label} {c['tag']} token {i}: GPU {a} CPU {b} "
                                        f"(|Δ| {e:.2e} > {max_bound:.2e})")
            mean = sum(errs) / max(1, len(errs))
            hf_mean = sum(hf_errs) / max(1, len(hf_errs))
            mean_bound = max(TOL, MEAN_FACTOR * hf_mean)
            if not mean <= mean_bound:
                failures.append(f"{name} {label}: mean |Δ| {mean:.2e} > {mean_bound:.2e} "
                                f"(HF bf16 {hf_mean:.2e} on the same tokens)")
            print(f"{name:<18} {label:<26} {len(cpu)} rows, {len(errs)} tokens: |GPU−CPU| "
                  f"mean {mean:.2e} max {max(errs, default=0):.2e} | HF bf16 mean {hf_mean:.2e} "
                  f"max {max(hf_errs, default=0):.2e} (same tokens) | bound mean {mean_bound:.2e} "
                  f"max {max_bound:.2e}", flush=True)
    if failures:
        print(f"{len(failures)} failures:\n" + "\n".join(failures[:50]))
        sys.exit(1)
    print(f"all {len(models)} models: GPU output matches the CPU's format, log-probs within HF bf16's error")


if __name__ == "__main__":
    main()
