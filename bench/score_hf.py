#!/usr/bin/env python3
"""Baseline for `prefer score`: HF transformers forward + log_softmax + gather, bf16.

Mirrors GUIDE.md §5's anchor: 64 rows × 1024 tokens, batch 8, bf16, transformers' default
attention (sdpa; for gemma2 sdpa skips the soft-cap, so this baseline does slightly less work
than a correct run). One warm-up pass, then one timed pass. Prints one JSON line: tokens/s,
peak GiB (allocated and reserved), MFU (2 · params · tokens / s / 790 TFLOP/s).

    python3 bench/score_hf.py MODEL_DIR [--rows 64] [--seq 1024] [--batch 8]
    python3 bench/score_hf.py MODEL_DIR --data ROWS.jsonl [--dump LOGPS.json] [--json-out F]

With --data, the rows `prefer score` reads (prompt_ids + completion_ids, all rows of one
length, see bench/gpu/make_rows.py) are scored the same way: log p of each completion token,
from the logits of the positions before it. --dump writes those per-token log-probs (a list
per row, from the timed pass) to compare with prefer's output.
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def load_rows(path):
    """(ids [rows, T] tensor, prompt lengths) from prefer's JSON Lines rows."""
    rows, prompt_lens = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            rows.append(r["prompt_ids"] + r["completion_ids"])
            prompt_lens.append(len(r["prompt_ids"]))
            if len(rows[-1]) != len(rows[0]):
                raise SystemExit(f"{path}:{n}: every row must have the same length "
                                 f"({len(rows[0])} tokens) to batch without padding")
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return torch.tensor(rows), prompt_lens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--data", help="JSON Lines rows with prompt_ids and completion_ids")
    ap.add_argument("--dump", help="write the per-token log-probs of each row (JSON) here")
    ap.add_argument("--json-out", help="also write the result line to this file")
    args = ap.parse_args()

    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                 attn_implementation=args.attn).cuda().eval()
    load_s = time.perf_counter() - t_load
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    if args.data:
        ids, prompt_lens = load_rows(args.data)
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (args.rows, args.seq), generator=g)
        prompt_lens = [1] * args.rows
    ids = ids.cuda()
    rows, seq = ids.shape
    # Row r scores positions prompt_lens[r] .. seq-1 from the logits one position before.
    first = min(prompt_lens)

    def run():
        total, per_row = 0.0, []
        for i in range(0, rows, args.batch):
            x = ids[i:i + args.batch]
            logits = model(input_ids=x).logits[:, first - 1:-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, first:, None]).squeeze(-1)
            for j in range(x.shape[0]):
                per_row.append(lp[j, prompt_lens[i + j] - first:])
            total += lp.sum().item()
        return total, per_row

    with torch.no_grad():
        run()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        _, per_row = run()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    tokens = rows * seq
    result = {
        "impl": "transformers", "model": args.model, "rows": rows, "seq": seq, "batch": args.batch,
        "attn": args.attn, "tokens": tokens, "scored_tokens": sum(seq - p for p in prompt_lens),
        "seconds": dt, "load_s": load_s, "tokens_per_s": tokens / dt,
        "mfu": 2 * n_params * tokens / dt / 790e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "params": n_params, "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump([[round(v, 6) for v in r.tolist()] for r in per_row], f)


if __name__ == "__main__":
    main()
