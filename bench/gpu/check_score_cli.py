#!/usr/bin/env python3
"""`prefer score --device cuda` against `--device cpu` on every fixture model, through the CLI.

For each model in fixtures/models: the reference's text rows and its sequences (as id rows
split in half) are scored on the CPU (f32) and on the GPU (bf16, once with the default batch
budget and once with --batch-tokens 7, which forces many batches). The outputs must have the
same rows with the same fields in the same order, and every token log-prob must agree within
2e-2. Prints the mean / max |GPU − CPU| per model; exits 1 on any failure.

    python3 bench/gpu/check_score_cli.py PREFER_BINARY [--fixtures fixtures] [--work DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

TOL = 2e-2


def rows_for(reference):
    rows = [{"prompt": t["prompt"], "completion": t["completion"], "tag": f"text{i}"}
            for i, t in enumerate(reference["text"]) if not t["add_eos"]]
    for i, s in enumerate(reference["sequences"]):
        ids = s["ids"]
        if len(ids) >= 2:
            half = max(1, len(ids) // 2)
            rows.append({"tag": f"seq{i}", "prompt_ids": ids[:half], "completion_ids": ids[half:]})
    return rows


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
        data = os.path.join(args.work, name + ".jsonl")
        with open(data, "w") as f:
            for r in rows_for(reference):
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
            errs = []
            if len(gpu) != len(cpu):
                failures.append(f"{name} {label}: {len(gpu)} rows, CPU {len(cpu)}")
                continue
            for g, c in zip(gpu, cpu):
                if list(g.keys()) != list(c.keys()):
                    failures.append(f"{name} {label} {c['tag']}: fields {list(g)} vs {list(c)}")
                if len(g["token_logps"]) != len(c["token_logps"]):
                    failures.append(f"{name} {label} {c['tag']}: token count differs")
                    continue
                for i, (a, b) in enumerate(zip(g["token_logps"], c["token_logps"])):
                    errs.append(abs(a - b))
                    if not abs(a - b) < TOL:
                        failures.append(f"{name} {label} {c['tag']} token {i}: GPU {a} CPU {b}")
            mean = sum(errs) / max(1, len(errs))
            print(f"{name:<18} {label:<26} {len(cpu)} rows, {len(errs)} tokens: |GPU−CPU| "
                  f"mean {mean:.2e} max {max(errs, default=0):.2e}", flush=True)
    if failures:
        print(f"{len(failures)} failures:\n" + "\n".join(failures[:50]))
        sys.exit(1)
    print(f"all {len(models)} models: GPU output matches the CPU's format and log-probs within {TOL}")


if __name__ == "__main__":
    main()
