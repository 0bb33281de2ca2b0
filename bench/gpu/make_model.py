#!/usr/bin/env python3
"""Write a random-weight HF checkpoint of a benchmark shape, fast (numpy only, no torch).

The same shapes, tensor names and config as tools/make_random_model.py (imported from there),
but the bf16 values come from one 64 MiB pool of N(0, 0.02²) draws, read at a random offset for
each tensor and streamed to disk: writing gemma9b (9.2B parameters, 18.5 GB) costs the disk
write only, not 9.2B normal draws. Speed does not depend on the values; norm weights are drawn
properly (they are tiny).

    python3 bench/gpu/make_model.py gemma9b /tmp/gemma9b [--seed 0]
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # a copy beside this file (.gpu/scripts)
from make_random_model import SHAPES, tensor_shapes, to_bf16_bytes  # noqa: E402

POOL_ELEMS = 32 << 20  # 64 MiB of bf16


def config_for(shape):
    """config.json as tools/make_random_model.py writes it for bf16."""
    cfg = dict(SHAPES[shape])
    cfg.update(architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                               "gemma2": "Gemma2ForCausalLM"}[cfg["model_type"]]],
               max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0,
               torch_dtype="bfloat16")
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    cfg = config_for(args.shape)
    shapes = tensor_shapes(cfg)
    rng = np.random.default_rng(args.seed)
    pool = to_bf16_bytes(0.02 * rng.standard_normal(POOL_ELEMS, dtype=np.float32))
    pool = memoryview(pool + pool)  # doubled, so any offset has POOL_ELEMS elements after it

    header, offset = {}, 0
    for name, shp in shapes.items():
        n = int(np.prod(shp)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.safetensors")
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shp in shapes.items():
            n = int(np.prod(shp))
            if len(shp) == 1:
                base = 0.0 if cfg["model_type"] == "gemma2" else 1.0
                f.write(to_bf16_bytes(base + 0.02 * rng.standard_normal(n, dtype=np.float32)))
                continue
            left = n
            while left:
                take = min(left, POOL_ELEMS)
                start = int(rng.integers(0, POOL_ELEMS))
                f.write(pool[2 * start:2 * (start + take)])
                left -= take
    os.replace(path + ".tmp", path)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}, f, indent=2)
    params = sum(int(np.prod(s)) for s in shapes.values())
    print(f"{args.shape}: {params / 1e6:.1f}M parameters, {offset / 2**30:.2f} GiB → {args.out} "
          f"in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
