#!/usr/bin/env python3
"""Write benchmark rows for `prefer score` and bench/score_hf.py: JSON Lines of
{"prompt_ids": [...], "completion_ids": [...]}, ids uniform in [3, vocab) from a seeded numpy
generator, every row `--seq` tokens split `--prompt` / the rest.

With `--prompt 1` both tools score 1023 of 1024 positions per row — the same work as
transformers' log_softmax + gather over a whole row.

    python3 bench/gpu/make_rows.py --vocab 151936 --rows 64 --seq 1024 --prompt 1 OUT.jsonl
"""
import argparse
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 1 <= args.prompt < args.seq:
        ap.error("--prompt must be in [1, --seq)")
    ids = np.random.default_rng(args.seed).integers(3, args.vocab, size=(args.rows, args.seq))
    with open(args.out, "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"prompt_ids": row[:args.prompt], "completion_ids": row[args.prompt:]},
                               separators=(",", ":")) + "\n")
    print(f"{args.rows} rows × {args.seq} tokens (prompt {args.prompt}) → {args.out}")


if __name__ == "__main__":
    main()
