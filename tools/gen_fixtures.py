#!/usr/bin/env python3
"""Generate prefer's model fixtures: tiny random HF checkpoints + float32 references.

Runs where torch + transformers 5.17 are installed (the GPU machine), through
tools/gen_fixtures.sh. Everything it writes goes into one archive whose members
are rooted at `fixtures/`, so `tar xzf fixtures.tar.gz` at the repository root
drops them in place:

    fixtures/models/<name>/        config.json, model.safetensors (or shards +
                                   index), generation_config.json, tokenizer files
    fixtures/reference/<name>.json per-model reference log-probs / greedy / text
    fixtures/reference/tokenization.json
    fixtures/reference/MANIFEST.json  versions, per-model status, margins

fixtures/README.md documents every file and field (that is the contract with
the Rust tests). Each model is built from its transformers config class with
AutoModelForCausalLM.from_config(attn_implementation="eager"), its weights are
re-initialised with a seeded normal so next-token distributions are peaked,
saved with save_pretrained, its config.json edited where the fixture needs an
older or sparser shape, and then RELOADED with from_pretrained from the written
folder: every reference is computed from the model exactly as HF loads it.

A failure in one model is reported and the others are still produced; the
exit status is non-zero if anything failed.

    python3 tools/gen_fixtures.py --out OUTDIR [--device cpu|cuda] [--only a,b]
    python3 tools/gen_fixtures.py --dry-run   # no torch needed: configs + tokenization only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "fixtures" / "tokenizer"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

# The fixture tokenizer's ids (tools/make_tokenizer.py).
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
IM_END_ID = 7

ARCHIVE_LIMIT = 16 * 1024 * 1024
NEAR_TIE = 1e-4  # top1 - top2 logit margin below which a position is a near tie

SEQUENCE_LENGTHS = [1, 5, 23, 70]
GREEDY_PROMPT_LENGTHS = [3, 10, 20]
GREEDY_NEW_TOKENS = 40

KOREAN_TEMPLATE = (
    "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n"
    "###지시사항:\n{instruction}\n\n###답변:\n"
)

# (prompt, completion, add_eos). Row 3 splits a word across the prompt/completion
# boundary ("보험" | "료는"), so the common prefix is shorter than the prompt's ids.
TEXT_ROWS = [
    (KOREAN_TEMPLATE.format(instruction="자동차 보험의 자기부담금이 무엇인지 설명해 주세요."),
     "자기부담금은 사고가 났을 때 가입자가 직접 부담하는 금액입니다.", False),
    ("질문: 한국의 수도는 어디인가요?\n답변:", " 한국의 수도는 서울입니다. 🙂", False),
    ("다음 달 보험", "료는 35,000원이며 \"자동이체\"로 납부됩니다.\n감사합니다!", False),
    ("Translate to Korean: Good morning.\n", "좋은 아침입니다.", True),
]

TOKENIZATION_STRINGS = [
    "안녕하세요, 세계!",
    "Hello, world! How are you today?",
    "Mixed 한국어 and English: 보험료 35,000원 (monthly).",
    "   leading spaces, double  spaces and trailing   ",
    "line one\nline two\n\n\tindented line\r\nwindows line",
    "emoji 🙂🚀👍🏽 and 漢字 and ü é",
    "text with <eos> and <bos> and <start_of_turn>user inside",
    "<|im_start|>user\n질문<|im_end|>\n",
    KOREAN_TEMPLATE.format(instruction="보험금은 언제 지급되나요?"),
    "def f(x):\n    return {\"k\": [1, 2, 3]}  # 주석\n",
    "",
    "ㅋㅋㅋ 자모 ㄱㄴㄷ 그리고 조합형 한글",
]


# ---------------------------------------------------------------------------
# Model specs. `config` is passed to the transformers config class; `edit` is
# applied to the saved config.json (older shapes, removed keys, decoys).
# ---------------------------------------------------------------------------

def _old_dtype_key(cfg: dict) -> None:
    # Checkpoints written before transformers 5 name the dtype "torch_dtype".
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")


def _edit_llama_tiny(cfg: dict) -> None:
    # Older config shape: top-level rope_theta + rope_scaling keyed "rope_type".
    _old_dtype_key(cfg)
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }


def _edit_llama_ropeparams(cfg: dict) -> None:
    cfg.pop("head_dim", None)  # derived: hidden_size / num_attention_heads


def _edit_mistral_tiny(cfg: dict) -> None:
    # Oldest shape: top-level rope_theta + rope_scaling keyed "type".
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 10000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}


def _edit_qwen2_tiny(cfg: dict) -> None:
    # Like real Qwen2.5 configs: a window size is present but use_sliding_window
    # is false, so no layer slides (transformers drops the window on load).
    cfg["sliding_window"] = 8


def _edit_qwen2_window(cfg: dict) -> None:
    # Pre-transformers-5 shape: no layer_types; which layers slide follows from
    # use_sliding_window + max_window_layers (layers with index >= it slide).
    cfg.pop("layer_types", None)


def _edit_gemma_tiny(cfg: dict) -> None:
    cfg.pop("tie_word_embeddings", None)  # absent → gemma's default, true


def _edit_gemma_exactgelu(cfg: dict) -> None:
    cfg.pop("tie_word_embeddings", None)


def _edit_gemma2_oldconfig(cfg: dict) -> None:
    # Shaped like a real pre-transformers-5 gemma-2 config.json.
    cfg.pop("layer_types", None)  # older default: even-indexed layers slide
    cfg.pop("tie_word_embeddings", None)
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 10000.0  # top level, no rope_scaling at all
    _old_dtype_key(cfg)


def _rope(theta: float, rope_type: str = "default", **extra) -> dict:
    return {"rope_type": rope_type, "rope_theta": theta, **extra}


COMMON = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_position_embeddings=512)

SPECS = [
    dict(
        name="llama-tiny", family="llama", seed=1001, vocab="padded",
        config=dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=1, head_dim=24,
                    intermediate_size=200, num_hidden_layers=3, rms_norm_eps=1e-5,
                    tie_word_embeddings=False,
                    rope_parameters=_rope(500000.0, "llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
        edit=_edit_llama_tiny, gen_eos=[EOS_ID, IM_END_ID],
    ),
    dict(
        name="llama-ropeparams", family="llama", seed=1002, store_dtype="bfloat16",
        config=dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                    intermediate_size=160, num_hidden_layers=2, rms_norm_eps=1e-6,
                    tie_word_embeddings=True,
                    rope_parameters=_rope(10000.0, "linear", factor=2.0)),
        edit=_edit_llama_ropeparams,
    ),
    dict(
        name="mistral-tiny", family="mistral", seed=1003, shard="200KB",
        config=dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                    intermediate_size=136, num_hidden_layers=3, rms_norm_eps=1e-5,
                    sliding_window=16, tie_word_embeddings=False,
                    rope_parameters=_rope(10000.0, "linear", factor=2.0)),
        edit=_edit_mistral_tiny,
    ),
    dict(
        name="qwen2-tiny", family="qwen2", seed=1004,
        config=dict(hidden_size=84, num_attention_heads=7, num_key_value_heads=1,
                    intermediate_size=176, num_hidden_layers=3, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, use_sliding_window=False,
                    rope_parameters=_rope(1000000.0)),
        edit=_edit_qwen2_tiny,
    ),
    dict(
        name="qwen2-window", family="qwen2", seed=1005,
        config=dict(hidden_size=56, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=112, num_hidden_layers=4, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, use_sliding_window=True, sliding_window=12,
                    max_window_layers=2, rope_parameters=_rope(1000000.0)),
        edit=_edit_qwen2_window,
    ),
    dict(
        name="gemma-tiny", family="gemma", seed=1006, std_mlp=0.3,
        config=dict(hidden_size=64, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                    intermediate_size=144, num_hidden_layers=3, rms_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                    tie_word_embeddings=True, rope_parameters=_rope(10000.0)),
        edit=_edit_gemma_tiny,
    ),
    dict(
        # transformers 5.17's GemmaMLP reads `hidden_act` (Gemma2MLP reads `hidden_activation`).
        # Larger MLP weights put the gate pre-activations where exact and
        # tanh-approximated GELU differ most, so using the wrong one shows.
        name="gemma-exactgelu", family="gemma", seed=1007, std_mlp=0.4,
        config=dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                    intermediate_size=64, num_hidden_layers=2, rms_norm_eps=1e-6,
                    hidden_act="gelu", tie_word_embeddings=True, rope_parameters=_rope(10000.0)),
        edit=_edit_gemma_exactgelu,
    ),
    dict(
        name="gemma2-tiny", family="gemma2", seed=1008,
        config=dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=96, num_hidden_layers=4, rms_norm_eps=1e-6,
                    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    # Untied (explicitly false): with gemma2's post-norms a tied head
                    # mostly predicts the input token again, and greedy runs collapse
                    # into one repeated id. gemma2-oldconfig covers the tied default.
                    tie_word_embeddings=False, rope_parameters=_rope(10000.0)),
    ),
    dict(
        # Also carries a decoy `hidden_act: "gelu"`, as real gemma-2 configs carry
        # a hidden_act key: gemma2 in transformers 5.17 uses hidden_activation only.
        # A smaller embedding std keeps its tied head from mostly repeating the input token.
        name="gemma2-oldconfig", family="gemma2", seed=1009, std_embed=0.1,
        config=dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                    intermediate_size=80, num_hidden_layers=3, rms_norm_eps=1e-6,
                    hidden_activation="gelu_pytorch_tanh", hidden_act="gelu",
                    query_pre_attn_scalar=24, attn_logit_softcapping=8.0,
                    final_logit_softcapping=6.0, sliding_window=6,
                    tie_word_embeddings=True, rope_parameters=_rope(10000.0)),
        edit=_edit_gemma2_oldconfig,
    ),
]

# Re-initialisation scales (see reinit()).
STD_EMBED = 0.3
STD_LINEAR = 0.15
STD_BIAS = 0.2
STD_NORM = 0.1


def log(msg: str) -> None:
    print(f"[gen_fixtures {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def vocab_size_for(spec: dict, tok_len: int) -> int:
    if spec.get("vocab") == "padded":
        return (tok_len + 7) // 8 * 8 if tok_len % 8 else tok_len + 8
    return tok_len


def make_config(spec: dict, tok_len: int):
    from transformers import AutoConfig

    kwargs = dict(COMMON)
    kwargs.update(spec["config"])
    kwargs["vocab_size"] = vocab_size_for(spec, tok_len)
    return AutoConfig.for_model(spec["family"], **kwargs)


# ---------------------------------------------------------------------------
# Tokenization reference (no torch needed).
# ---------------------------------------------------------------------------

def tokenization_reference(tok) -> dict:
    cases = []
    for s in TOKENIZATION_STRINGS:
        with_sp = tok(s, add_special_tokens=True).input_ids
        without = tok(s, add_special_tokens=False).input_ids
        cases.append({
            "text": s,
            "ids_with_special": with_sp,
            "ids_without_special": without,
            "decode_with_special": tok.decode(with_sp, skip_special_tokens=False),
            "decode_skip_special": tok.decode(with_sp, skip_special_tokens=True),
            "tokens": tok.convert_ids_to_tokens(without),
        })
    return {
        "tokenizer": "fixtures/tokenizer",
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "cases": cases,
    }


# ---------------------------------------------------------------------------
# Torch parts.
# ---------------------------------------------------------------------------

def reinit(model, family: str, seed: int, std_mlp: float = STD_LINEAR, std_embed: float = STD_EMBED) -> None:
    """Seeded normal weights so distributions are peaked and margins not tiny.

    Norm weights: llama-style norms multiply by w, so 1 + noise; Gemma's norms
    multiply by (1 + w), so noise around 0. Biases (qwen2 q/k/v) non-zero.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    gemma_like = family in ("gemma", "gemma2")
    with torch.no_grad():
        # named_parameters() lists a tied lm_head once (as embed_tokens).
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                vals = noise * STD_NORM + (0.0 if gemma_like else 1.0)
            elif p.ndim == 1:
                vals = noise * STD_BIAS
            elif "embed_tokens" in name or "lm_head" in name:
                vals = noise * std_embed
            elif ".mlp." in name:
                vals = noise * std_mlp
            else:
                vals = noise * STD_LINEAR
            p.copy_(vals.to(p.dtype))


def build_and_save(spec: dict, tok_len: int, folder: Path) -> dict:
    """Build, re-init, save, edit config.json. Returns the config.json as written."""
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(spec, tok_len)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    reinit(model, spec["family"], spec["seed"], spec.get("std_mlp", STD_LINEAR), spec.get("std_embed", STD_EMBED))
    store = spec.get("store_dtype", "float32")
    if store == "bfloat16":
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
    if folder.exists():
        shutil.rmtree(folder)
    save_kwargs = {}
    if "shard" in spec:
        save_kwargs["max_shard_size"] = spec["shard"]
    model.save_pretrained(str(folder), **save_kwargs)

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if spec.get("edit"):
        spec["edit"](cfg)
    write_json(cfg_path, cfg)

    gen_cfg = {"bos_token_id": BOS_ID, "eos_token_id": spec.get("gen_eos", EOS_ID), "pad_token_id": PAD_ID}
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        existing = json.loads(gen_path.read_text(encoding="utf-8"))
        existing.update(gen_cfg)
        gen_cfg = existing
    write_json(gen_path, gen_cfg)

    for f in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / f, folder / f)

    # Check the folder has the shape the fixture promises.
    if "shard" in spec:
        if not (folder / "model.safetensors.index.json").exists():
            raise RuntimeError("expected a sharded checkpoint (model.safetensors.index.json) but none was written")
        shards = sorted(folder.glob("model-*.safetensors"))
        if len(shards) < 2:
            raise RuntimeError(f"expected 2+ shards, got {len(shards)}")
    elif not (folder / "model.safetensors").exists():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors: {sorted(os.listdir(folder))}")
    return cfg


def check_stored_dtype(folder: Path, expected: str) -> None:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    want = {"float32": "F32", "bfloat16": "BF16"}[expected]
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                got = sf.get_slice(key).get_dtype()
                if got != want:
                    raise RuntimeError(f"{f.name}:{key} stored as {got}, expected {want}")


def load(folder: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    model.to(device)
    model.eval()
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise RuntimeError(f"reloaded parameter {name} is {p.dtype}, expected float32")
    return model


def full_logits(model, ids: list[int], device: str):
    """[T, V] float32 logits of one unpadded sequence (after any final soft-cap)."""
    import torch

    x = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    logits = out.logits[0].float().cpu()
    if logits.shape[0] != len(ids):
        raise RuntimeError(f"logits have {logits.shape[0]} rows for {len(ids)} ids")
    return logits


def position_stats(logits32):
    """Per-position statistics: f64 log-softmax of the f32 logits; argmax and margins from the f32 values."""
    import torch

    lg = logits32.double()
    logp = torch.log_softmax(lg, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mean_logit = lg.mean(-1)
    argmax = torch.argmax(logits32, dim=-1)  # first maximal index → ties go to the lowest id
    top2 = torch.topk(logits32, 2, dim=-1).values.double()
    margin = top2[:, 0] - top2[:, 1]
    return logp, entropy, mean_logit, argmax, margin


def sequence_reference(model, ids: list[int], device: str) -> tuple[dict, float]:
    logits = full_logits(model, ids, device)
    logp, entropy, mean_logit, argmax, margin = position_stats(logits)
    logprobs = [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    row = {
        "ids": ids,
        "logprobs": logprobs,
        "argmax": [int(a) for a in argmax],
        "entropy": [float(e) for e in entropy],
        "mean_logit": [float(m) for m in mean_logit],
        "margins": [float(m) for m in margin],
        "near_ties": [t for t in range(len(ids)) if float(margin[t]) < NEAR_TIE],
    }
    return row, float(margin.min())


def greedy_reference(model, prompt: list[int], device: str) -> tuple[dict, float]:
    import torch

    # EOS must not stop the run: clear it on the loaded generation config
    # (generate() fills unset values from it, so passing eos_token_id=None is not enough).
    model.generation_config.eos_token_id = None
    x = torch.tensor([prompt], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=GREEDY_NEW_TOKENS,
            pad_token_id=PAD_ID,
            return_dict_in_generate=True,
            output_logits=True,
        )
    new = [int(t) for t in out.sequences[0, len(prompt):].tolist()]
    if len(new) != GREEDY_NEW_TOKENS:
        raise RuntimeError(f"generate returned {len(new)} new tokens, expected {GREEDY_NEW_TOKENS}")
    step_logits = torch.stack([lg[0].float().cpu() for lg in out.logits])  # [N, V]
    top2 = torch.topk(step_logits, 2, dim=-1).values.double()
    step_margin = top2[:, 0] - top2[:, 1]
    # Independent check: recompute every step without the KV cache.
    full = full_logits(model, prompt + new, device)
    nocache = torch.argmax(full[len(prompt) - 1 : -1], dim=-1).tolist()
    agrees = nocache == new
    if not agrees:
        first = next(i for i, (a, b) in enumerate(zip(nocache, new)) if a != b)
        log(f"  WARNING: generate (KV cache) and no-cache argmax differ first at step {first}")
    row = {
        "prompt_ids": prompt,
        "output_ids": new,
        "max_new_tokens": GREEDY_NEW_TOKENS,
        "margins": [float(m) for m in step_margin],
        "near_ties": [i for i in range(len(new)) if float(step_margin[i]) < NEAR_TIE],
        "nocache_agrees": agrees,
    }
    return row, float(step_margin.min())


def common_prefix_len(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def text_reference(model, tok, prompt: str, completion: str, add_eos: bool, device: str) -> tuple[dict, float]:
    import torch

    completion_text = completion + (tok.eos_token if add_eos else "")
    prompt_ids = tok(prompt).input_ids
    full = tok(prompt + completion_text).input_ids
    k = common_prefix_len(prompt_ids, full)
    completion_ids = full[k:]
    if not completion_ids:
        raise RuntimeError(f"empty completion for {completion!r}")
    logits = full_logits(model, full, device)
    logp, _, _, _, margin = position_stats(logits)
    lps = [float(logp[t - 1, full[t]]) for t in range(k, len(full))]
    row = {
        "prompt": prompt,
        "completion": completion,
        "add_eos": add_eos,
        "prompt_ids": prompt_ids,
        "prefix_len": k,
        "completion_ids": completion_ids,
        "completion_logprobs": lps,
        "completion_logp": float(sum(lps)),
    }
    return row, float(margin[k - 1 : len(full) - 1].min())


def model_reference(spec: dict, folder: Path, tok, device: str, tok_len: int) -> dict:
    import torch

    model = load(folder, device)
    vocab = model.config.vocab_size
    rng = random.Random(spec["seed"])
    margins = []
    sequences = []
    for n in SEQUENCE_LENGTHS:
        ids = [rng.randrange(tok_len) for _ in range(n)]
        row, m = sequence_reference(model, ids, device)
        sequences.append(row)
        margins.append(m)
    greedy = []
    for n in GREEDY_PROMPT_LENGTHS:
        prompt = [rng.randrange(tok_len) for _ in range(n)]
        row, m = greedy_reference(model, prompt, device)
        greedy.append(row)
        margins.append(m)
    text = []
    for prompt, completion, add_eos in TEXT_ROWS:
        row, m = text_reference(model, tok, prompt, completion, add_eos, device)
        text.append(row)
        margins.append(m)
    ent = torch.tensor([e for s in sequences for e in s["entropy"]])
    summary = {
        "min_margin": min(margins),
        "mean_entropy": float(ent.mean()),
        "max_entropy": float(ent.max()),
        "ln_vocab": math.log(vocab),
        "near_ties": sum(len(s["near_ties"]) for s in sequences) + sum(len(g["near_ties"]) for g in greedy),
        "nocache_agrees": all(g["nocache_agrees"] for g in greedy),
    }
    return {
        "model": spec["name"],
        "family": spec["family"],
        "vocab_size": vocab,
        "stored_dtype": spec.get("store_dtype", "float32"),
        "sequences": sequences,
        "greedy": greedy,
        "text": text,
        "summary": summary,
    }


def run_model(spec: dict, tok, staging: Path, device: str, tok_len: int) -> dict:
    folder = staging / "fixtures" / "models" / spec["name"]
    build_and_save(spec, tok_len, folder)
    check_stored_dtype(folder, spec.get("store_dtype", "float32"))
    ref = model_reference(spec, folder, tok, device, tok_len)
    write_json(staging / "fixtures" / "reference" / f"{spec['name']}.json", ref)
    return ref["summary"]


def make_archive(staging: Path, archive: Path) -> int:
    tmp = archive.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=9) as tar:
        tar.add(str(staging / "fixtures"), arcname="fixtures", recursive=True)
    size = tmp.stat().st_size
    tmp.replace(archive)
    return size


def dry_run(tok, tok_len: int) -> None:
    """Exercise everything that needs no torch: configs (as saved and as edited) and tokenization."""
    from transformers import AutoConfig

    for spec in SPECS:
        config = make_config(spec, tok_len)
        cfg = config.to_dict()
        if spec.get("edit"):
            spec["edit"](cfg)
        reread = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "transformers_version"})
        print(f"{spec['name']}: vocab {reread.vocab_size}, head_dim {getattr(reread, 'head_dim', None)}, "
              f"rope {getattr(reread, 'rope_parameters', None)}, layer_types {getattr(reread, 'layer_types', None)}, "
              f"window {getattr(reread, 'sliding_window', None)}, tie {reread.tie_word_embeddings}, "
              f"act {getattr(reread, 'hidden_act', None)}/{getattr(reread, 'hidden_activation', None)}")
    for prompt, completion, add_eos in TEXT_ROWS:
        p = tok(prompt).input_ids
        full = tok(prompt + completion + (tok.eos_token if add_eos else "")).input_ids
        k = common_prefix_len(p, full)
        print(f"text row: prompt {len(p)} ids, full {len(full)}, prefix {k}, completion {full[k:][:8]}...")
    ref = tokenization_reference(tok)
    print(f"tokenization.json: {len(ref['cases'])} cases")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gen_fixtures_out")),
                        help="folder for fixtures.tar.gz (default $OUT)")
    parser.add_argument("--device", default="cpu", help="cpu (default; exact f32) or cuda")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--staging", type=Path, default=None, help="keep the unpacked tree here (default: a temp dir)")
    parser.add_argument("--dry-run", action="store_true", help="no torch: check configs and tokenization only")
    args = parser.parse_args()

    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok_len = len(tok)
    if args.dry_run:
        log(f"dry run: transformers {transformers.__version__}, tokenizer len {tok_len}")
        dry_run(tok, tok_len)
        return 0

    import torch

    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"cuda available {torch.cuda.is_available()}, device {args.device}")
    if not transformers.__version__.startswith("5."):
        log(f"WARNING: expected transformers 5.x, got {transformers.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        log("cuda requested but not available; using cpu")
        device = "cpu"

    staging_ctx = None
    if args.staging:
        staging = args.staging
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    else:
        staging_ctx = tempfile.TemporaryDirectory(prefix="gen_fixtures_")
        staging = Path(staging_ctx.name)

    only = {s for s in args.only.split(",") if s}
    unknown = only - {s["name"] for s in SPECS}
    if unknown:
        log(f"unknown model names in --only: {sorted(unknown)}")
        return 2

    manifest = {
        "generator": "tools/gen_fixtures.py",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "tokenizer_len": tok_len,
        "models": {},
        "failed": {},
    }
    try:
        write_json(staging / "fixtures" / "reference" / "tokenization.json", tokenization_reference(tok))
        log("tokenization.json written")
    except Exception:
        manifest["failed"]["tokenization"] = traceback.format_exc()
        log("FAILED tokenization.json:\n" + traceback.format_exc())

    for spec in SPECS:
        if only and spec["name"] not in only:
            continue
        t0 = time.time()
        log(f"{spec['name']}: building")
        try:
            summary = run_model(spec, tok, staging, device, tok_len)
            manifest["models"][spec["name"]] = summary
            log(f"{spec['name']}: ok in {time.time() - t0:.1f}s; min top1-top2 margin {summary['min_margin']:.3g}, "
                f"entropy mean {summary['mean_entropy']:.3f} max {summary['max_entropy']:.3f} "
                f"(ln V {summary['ln_vocab']:.3f}), near ties {summary['near_ties']}, "
                f"generate == no-cache argmax: {summary['nocache_agrees']}")
        except Exception:
            manifest["failed"][spec["name"]] = traceback.format_exc()
            log(f"FAILED {spec['name']}:\n{traceback.format_exc()}")
            shutil.rmtree(staging / "fixtures" / "models" / spec["name"], ignore_errors=True)

    write_json(staging / "fixtures" / "reference" / "MANIFEST.json", manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    archive = args.out / "fixtures.tar.gz"
    size = make_archive(staging, archive)
    log(f"wrote {archive} ({size / 1024 / 1024:.2f} MiB)")
    if staging_ctx:
        staging_ctx.cleanup()
    status = 0
    if size > ARCHIVE_LIMIT:
        log(f"ERROR: archive is {size} bytes, over the 16 MiB limit")
        status = 1
    if manifest["failed"]:
        log(f"ERROR: failed: {sorted(manifest['failed'])}")
        status = 1
    else:
        log(f"all {len(manifest['models'])} models ok")
    return status


if __name__ == "__main__":
    sys.exit(main())
