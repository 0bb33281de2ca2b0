#!/usr/bin/env python3
"""Write a random-weight HF checkpoint of a real model's shape (numpy only, no torch).

Used by the benchmarks: real weights cannot be downloaded here, and speed does not depend on
the values. Shapes are GUIDE.md §5's; `llama100m` is the ~100M-parameter CPU benchmark model.

    python3 tools/make_random_model.py llama1b /tmp/llama1b [--dtype bf16|f32] [--tokenizer DIR]
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

SHAPES = {
    "qwen05": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, head_dim=64, intermediate_size=4864, vocab_size=151936,
                   tie_word_embeddings=True, rope_theta=1e6, hidden_act="silu", rms_norm_eps=1e-6),
    "llama1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                    tie_word_embeddings=True, rope_theta=5e5, hidden_act="silu", rms_norm_eps=1e-5),
    "gemma2b": dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=256, intermediate_size=9216, vocab_size=256000,
                    tie_word_embeddings=True, rope_theta=1e4, hidden_activation="gelu_pytorch_tanh",
                    rms_norm_eps=1e-6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    sliding_window=4096, query_pre_attn_scalar=256),
    "gemma9b": dict(model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=256, intermediate_size=14336, vocab_size=256000,
                    tie_word_embeddings=True, rope_theta=1e4, hidden_activation="gelu_pytorch_tanh",
                    rms_norm_eps=1e-6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    sliding_window=4096, query_pre_attn_scalar=256),
    # ~100M parameters: the CPU benchmark of `prefer score`.
    "llama100m": dict(model_type="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, head_dim=64, intermediate_size=2048, vocab_size=32000,
                      tie_word_embeddings=True, rope_theta=1e4, hidden_act="silu", rms_norm_eps=1e-5),
}


def tensor_shapes(cfg):
    """HF parameter names and shapes of a decoder of this config."""
    c, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    gemma2 = cfg["model_type"] == "gemma2"
    out = {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, c)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out[p + "self_attn.q_proj.weight"] = (h * d, c)
        out[p + "self_attn.k_proj.weight"] = (kv * d, c)
        out[p + "self_attn.v_proj.weight"] = (kv * d, c)
        out[p + "self_attn.o_proj.weight"] = (c, h * d)
        if cfg["model_type"] == "qwen2":
            out[p + "self_attn.q_proj.bias"] = (h * d,)
            out[p + "self_attn.k_proj.bias"] = (kv * d,)
            out[p + "self_attn.v_proj.bias"] = (kv * d,)
        out[p + "mlp.gate_proj.weight"] = (i, c)
        out[p + "mlp.up_proj.weight"] = (i, c)
        out[p + "mlp.down_proj.weight"] = (c, i)
        out[p + "input_layernorm.weight"] = (c,)
        out[p + "post_attention_layernorm.weight"] = (c,)
        if gemma2:
            out[p + "pre_feedforward_layernorm.weight"] = (c,)
            out[p + "post_feedforward_layernorm.weight"] = (c,)
    return out


def to_bf16_bytes(a):
    """float32 → bfloat16 bytes, round to nearest even."""
    u = a.astype(np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_safetensors(path, tensors, dtype):
    """The safetensors format: u64 header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = to_bf16_bytes(arr) if dtype == "bf16" else arr.astype("<f4").tobytes()
        header[name] = {"dtype": "BF16" if dtype == "bf16" else "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--tokenizer", help="folder whose tokenizer files are copied in")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = dict(SHAPES[args.shape])
    cfg.update(architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                               "gemma2": "Gemma2ForCausalLM"}[cfg["model_type"]]],
               max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0,
               torch_dtype="bfloat16" if args.dtype == "bf16" else "float32")
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    tensors = {}
    for name, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            base = 0.0 if cfg["model_type"] == "gemma2" else 1.0
            tensors[name] = (base + 0.02 * rng.standard_normal(shape, dtype=np.float32))
        else:
            tensors[name] = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    write_safetensors(os.path.join(args.out, "model.safetensors"), tensors, args.dtype)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}, f, indent=2)
    if args.tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = os.path.join(args.tokenizer, name)
            if os.path.exists(src):
                shutil.copy(src, args.out)
    n = sum(int(np.prod(s)) for s in tensor_shapes(cfg).values())
    print(f"{args.shape}: {n / 1e6:.1f}M parameters → {args.out}")


if __name__ == "__main__":
    main()
