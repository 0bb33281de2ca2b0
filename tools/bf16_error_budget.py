#!/usr/bin/env python3
"""How much of a bf16 engine's log-prob error comes from the bf16 weights alone.

For each fixture model, the reference sequences' next-token log-probs are computed by HF
transformers twice, both entirely in float64 on the CPU (eager attention):

- `exact`: the checkpoint's weights as stored (f32 fixtures keep every bit);
- `bf16 weights`: every parameter rounded to bfloat16 (round to nearest even, what any bf16
  engine, ours or transformers', holds), activations still float64.

Their difference is the error no bf16 engine can avoid, before a single activation is rounded.
The script prints a markdown table of it per model beside transformers' own full-bf16 error
(read from fixtures/reference/<name>.bf16.json, tools/gen_bf16_reference.py) — docs/precision.md
quotes that table. Deterministic; runs with torch 2.11 + transformers 5.17 on the CPU:

    python tools/bf16_error_budget.py [--only llama-tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "fixtures" / "models"
REFERENCE = REPO / "fixtures" / "reference"


def sequence_logprobs(model, ref: dict) -> list[float]:
    """log p(ids[t+1] | ids[..=t]) over every reference sequence, concatenated."""
    import torch

    out = []
    for s in ref["sequences"]:
        ids = s["ids"]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
        lp = torch.log_softmax(logits.double(), dim=-1)
        out += [float(lp[t, tgt]) for t, tgt in enumerate(ids[1:])]
    return out


def errors(a: list[float], b: list[float]) -> tuple[float, float]:
    if len(a) != len(b):
        raise RuntimeError(f"{len(a)} log-probs against {len(b)}")
    e = [abs(x - y) for x, y in zip(a, b)]
    return sum(e) / len(e), max(e)


def hf_bf16_errors(name: str, ref: dict) -> tuple[float, float]:
    """transformers' full-bf16 error on the same tokens, from the committed reference."""
    with open(REFERENCE / f"{name}.bf16.json", encoding="utf-8") as f:
        bf16 = json.load(f)
    a = [x for s in bf16["sequences"] for x in s["logprobs"]]
    b = [x for s in ref["sequences"] for x in s["logprobs"]]
    return errors(a, b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated model names")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = sorted(p.name for p in MODELS.iterdir() if (REFERENCE / f"{p.name}.bf16.json").is_file())
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    print("| model | stored | tokens | bf16 weights only: mean | max | transformers bf16: mean | max |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        with open(REFERENCE / f"{name}.json", encoding="utf-8") as f:
            ref = json.load(f)
        model = AutoModelForCausalLM.from_pretrained(str(MODELS / name), dtype=torch.float64,
                                                     attn_implementation="eager").eval()
        exact = sequence_logprobs(model, ref)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float64))
        rounded = sequence_logprobs(model, ref)
        w_mean, w_max = errors(rounded, exact)
        h_mean, h_max = hf_bf16_errors(name, ref)
        print(f"| {name} | {ref['stored_dtype']} | {len(exact)} | {w_mean:.1e} | {w_max:.1e} | {h_mean:.1e} | {h_max:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
