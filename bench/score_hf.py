#!/usr/bin/env python3
"""Baseline for `prefer score`: HF transformers forward + log_softmax + gather, bf16.

Mirrors GUIDE.md §5's anchor: 64 rows × 1024 tokens, batch 8, bf16, transformers' default
attention (sdpa; for gemma2 sdpa skips the soft-cap, so this baseline does slightly less work
than a correct run). Prints one JSON line: tokens/s, peak GiB, MFU.

    python3 bench/score_hf.py MODEL_DIR [--rows 64] [--seq 1024] [--batch 8]
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                 attn_implementation=args.attn).cuda().eval()
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.rows, args.seq), generator=g).cuda()

    def run():
        total = 0.0
        for i in range(0, args.rows, args.batch):
            x = ids[i:i + args.batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
            total += lp.sum().item()
        return total

    with torch.no_grad():
        run()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    tokens = args.rows * args.seq
    print(json.dumps({
        "impl": "transformers", "model": args.model, "tokens": tokens, "seconds": dt,
        "tokens_per_s": tokens / dt, "mfu": 2 * n_params * tokens / dt / 790e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "params": n_params,
    }))


if __name__ == "__main__":
    main()
