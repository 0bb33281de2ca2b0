#!/usr/bin/env python3
"""Preference rows of fixed token lengths for the DPO benchmark: prompt / chosen / rejected
texts decoded from random token ids of the fixture tokenizer, so that TRL's tokenization and
ours see the same text (re-encoding a decoded text gives about, not exactly, the same count).

    python3 bench/gpu/make_pairs.py TOKENIZER_DIR OUT.jsonl --rows 64 --prompt 256 --completion 256
"""
import argparse
import json
import os
import random

from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    rng = random.Random(args.seed)
    # Skip the special tokens (ids 0-7) so no row contains EOS or BOS.
    text = lambda n: tok.decode([rng.randrange(8, tok.get_vocab_size()) for _ in range(n)])
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        for _ in range(args.rows):
            row = {"prompt": text(args.prompt), "chosen": text(args.completion), "rejected": text(args.completion)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
