#!/usr/bin/env python3
"""LoRA forward and gradient references from PEFT 0.21 + transformers 5.17: fixtures/train/lora_grads/.

For each fixture model (fixtures/models/<name>) a PEFT LoRA adapter (r 4, alpha 8, dropout 0,
rsLoRA off) on all nine modules prefer supports — embed_tokens, q/k/v/o_proj,
gate/up/down_proj, lm_head — with every A and B set to seeded random values (PEFT's own
initialisation makes B zero, which would hide half the gradient paths). Three token
sequences of different lengths are scored: the log-prob of the next token at a few rows of
each. The "loss" is Σ w_i · log p_i with seeded weights w; autograd gives its gradient with
respect to every LoRA tensor. Everything runs in float64 on the CPU (eager attention), so the
reference is exact next to prefer's f32 CPU backend.

Written per model, into fixtures/train/lora_grads/<name>/:
- adapter_model.safetensors: the adapter, PEFT's key names (f32 copies of the f64 values);
- grads.safetensors: d loss / d tensor, same key names (f32);
- case.json: r, alpha, target_modules, the sequences (ids), scored rows (sequence, position,
  target = the next id), weights, the log-probs with the adapter, with it disabled (DPO's
  reference), and the loss.

Deterministic (fixed seeds, one thread). Run from anywhere with torch 2.11, transformers 5.17,
peft 0.21 (on the CPU machine: /tmp/tvenv/bin/python):

    python tools/gen_lora_grad_fixtures.py [--only llama-tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "fixtures" / "models"
OUT = REPO / "fixtures" / "train" / "lora_grads"
TARGETS = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
R, ALPHA = 4, 8
LENS = [9, 14, 6]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file())
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    for seed, name in enumerate(names):
        base = AutoModelForCausalLM.from_pretrained(str(MODELS / name), dtype=torch.float64,
                                                    attn_implementation="eager").eval()
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                         task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg).eval()
        gen = torch.Generator().manual_seed(4242 + seed)
        lora_params = {}
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
                    p.requires_grad_(True)
                    lora_params[pname] = p
                else:
                    p.requires_grad_(False)
        vocab = base.config.vocab_size
        seqs, rows = [], []
        for s, n in enumerate(LENS):
            ids = torch.randint(8, vocab, (n,), generator=gen).tolist()
            seqs.append(ids)
            for pos in range(1, n - 1, 2):
                rows.append({"seq": s, "pos": pos, "target": ids[pos + 1]})
        weights = (torch.rand(len(rows), generator=gen, dtype=torch.float64) * 2 - 1).tolist()

        def logps(disable: bool):
            out = []
            for s, ids in enumerate(seqs):
                x = torch.tensor([ids])
                if disable:
                    with model.disable_adapter(), torch.no_grad():
                        logits = model(input_ids=x, use_cache=False).logits[0]
                else:
                    logits = model(input_ids=x, use_cache=False).logits[0]
                lp = torch.log_softmax(logits, dim=-1)
                out += [lp[r["pos"], r["target"]] for r in rows if r["seq"] == s]
            return out

        lp = logps(False)
        loss = sum(w * l for w, l in zip(weights, lp))
        loss.backward()
        ref = logps(True)

        def peft_key(pname: str) -> str:
            # PEFT's saved names: adapter name stripped ("lora_A.default.weight" → "lora_A.weight").
            return pname.replace(".default", "")

        adapter = {peft_key(k): v.detach().float().contiguous() for k, v in lora_params.items()}
        grads = {peft_key(k): v.grad.detach().float().contiguous() for k, v in lora_params.items()}
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        for fname, tensors in [("adapter_model.safetensors", adapter), ("grads.safetensors", grads)]:
            tmp = folder / (fname + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, folder / fname)
        case = {
            "model": name, "r": R, "lora_alpha": ALPHA, "target_modules": TARGETS,
            "sequences": seqs, "rows": rows, "weights": weights,
            "logprobs": [float(v) for v in lp], "reference_logprobs": [float(v) for v in ref],
            "loss": float(loss),
        }
        tmp = folder / "case.json.tmp"
        tmp.write_text(json.dumps(case, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "case.json")
        print(f"{name}: {len(rows)} rows, loss {float(loss):.6f}, {len(grads)} tensors", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
