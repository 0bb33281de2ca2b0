#!/usr/bin/env python3
"""What PEFT 0.21's merge_and_unload + transformers 5.17's save_pretrained produce from a base
model and a LoRA adapter: fixtures/train/merged/<model>.json, the reference of `prefer export`
(crates/model/src/merge.rs, tested by crates/model/tests/merge.rs).

For each model below, the base (fixtures/models/<model>, loaded in its stored dtype: f32, or
bf16 for llama-ropeparams) gets the adapter of fixtures/train/lora_grads/<model>/ (r 4,
alpha 8, all nine modules, random A and B; tools/gen_lora_grad_fixtures.py), PEFT merges it
(`merge_and_unload()`, the default unsafe in-place merge), and `save_pretrained` writes the
merged model. Recorded (field by field in fixtures/README.md, section "train/merged"):

- `header`: the safetensors header of the single-file save (`model.safetensors`): per
  tensor dtype, shape and data offsets, plus `__metadata__` — names, dtypes, shapes and the
  data order our writer must reproduce;
- `tensors`: per saved tensor, the f64 sum and sum of |x| of all its values and a few values
  at seeded flat indices (`samples`: [index, value]);
- `logprobs`: the merged model's log-softmax (run in float64 after the merge, eager
  attention, CPU) for a few targets at a few positions of two id sequences (`sequences`,
  `rows`: [{"seq", "pos", "targets"}], `logprobs` row by row, target by target);
- for llama-tiny, `sharded`: `save_pretrained(max_shard_size=SHARD_BYTES)`'s index (its
  `metadata` and `weight_map`) and file list — the sharding our writer must match.

Tied models (tie_word_embeddings true: gemma-tiny, gemma2-oldconfig, qwen2-tiny,
llama-ropeparams). With LoRA on both embed_tokens and lm_head, PEFT's merge adds *both*
deltas into the one shared matrix (E + ΔE + ΔH used as embedding and head), which is not the
model the adapter trained (embedding E + ΔE, head E + ΔH). So the reference unties first, as
PEFT's own warning recommends: the base is loaded with `tie_word_embeddings=False` and its
head set to a copy of the embedding, then the adapter is merged — each delta lands in its
own matrix, and the saved config says `tie_word_embeddings: false`. `peft_tied_merge`
records what PEFT does on the tied model as stored: whether the merged weights stay tied and
the largest |log p| difference from the reference (it is not small).

Deterministic (fixed seeds, one thread). Run from anywhere with torch 2.11, transformers
5.17, peft 0.21 (on the CPU machine: /tmp/tvenv/bin/python):

    python tools/gen_merge_fixtures.py [--only llama-tiny]   # writes fixtures/train/merged/
    python tools/gen_merge_fixtures.py --check               # fails if a committed file differs

`--check-export DIR --model NAME` instead loads a folder prefer wrote (`prefer export`, or a
test's output kept with PREFER_MERGE_KEEP) with transformers and compares its log-probs
with the fixture's (exit 1 beyond 1e-4): that transformers reads our files as we meant them.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "fixtures" / "models"
ADAPTERS = REPO / "fixtures" / "train" / "lora_grads"
OUT = REPO / "fixtures" / "train" / "merged"
NAMES = ["gemma-tiny", "gemma2-oldconfig", "llama-tiny", "qwen2-tiny", "llama-ropeparams", "mistral-tiny"]
SEQ_LENS = [11, 7]
N_SAMPLES = 24
EXTRA_TARGETS = 4
SHARD_MODEL, SHARD_BYTES = "llama-tiny", 200_000


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def load_base(name: str, untie: bool):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"tie_word_embeddings": False} if untie else {}
    model = AutoModelForCausalLM.from_pretrained(str(MODELS / name), dtype="auto",
                                                 attn_implementation="eager", **kwargs).eval()
    if untie:
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        assert not model.config.tie_word_embeddings
    return model


def merged_model(name: str, case: dict, adapter: dict, untie: bool):
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base = load_base(name, untie)
    cfg = LoraConfig(r=case["r"], lora_alpha=case["lora_alpha"], lora_dropout=0.0,
                     target_modules=case["target_modules"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg).eval()
    result = set_peft_model_state_dict(model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    assert not unexpected, unexpected
    # Every LoRA tensor holds the file's values, in float32 (PEFT keeps adapters in f32 on a
    # bf16 base: autocast_adapter_dtype).
    n = 0
    for pname, p in model.named_parameters():
        if "lora_" in pname:
            key = pname.replace(".default", "")
            assert p.dtype == torch.float32, (pname, p.dtype)
            assert torch.equal(p.detach(), adapter[key]), pname
            n += 1
    assert n == len(adapter), (n, len(adapter))
    return model.merge_and_unload()


def logprobs(model, seqs, rows):
    import torch

    m64 = model.to(torch.float64)
    out = []
    with torch.no_grad():
        for s, ids in enumerate(seqs):
            lp = torch.log_softmax(m64(input_ids=torch.tensor([ids]), use_cache=False).logits[0], dim=-1)
            for r in rows:
                if r["seq"] == s:
                    out += [float(lp[r["pos"], t]) for t in r["targets"]]
    return out


def tensor_summaries(folder: Path, gen) -> dict:
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for tname, t in sorted(load_file(str(f)).items()):
            flat = t.reshape(-1).to(torch.float64)
            idx = torch.randint(0, flat.numel(), (N_SAMPLES,), generator=gen).tolist()
            out[tname] = {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "sum": float(flat.sum()),
                "abs_sum": float(flat.abs().sum()),
                "samples": [[i, float(flat[i])] for i in idx],
            }
    return out


def case_for(name: str):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    case = json.loads((ADAPTERS / name / "case.json").read_text(encoding="utf-8"))
    adapter = load_file(str(ADAPTERS / name / "adapter_model.safetensors"))
    tied = bool(AutoConfig.from_pretrained(str(MODELS / name)).tie_word_embeddings)
    return case, adapter, tied, torch


def generate(name: str, seed: int) -> dict:
    case, adapter, tied, torch = case_for(name)
    gen = torch.Generator().manual_seed(777 + seed)
    vocab = json.loads((MODELS / name / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    seqs = [torch.randint(8, vocab, (n,), generator=gen).tolist() for n in SEQ_LENS]
    rows = []
    for s, ids in enumerate(seqs):
        for pos in (2, len(ids) // 2, len(ids) - 1):
            targets = ([ids[pos + 1]] if pos + 1 < len(ids) else [])
            targets += torch.randint(0, vocab, (EXTRA_TARGETS,), generator=gen).tolist()
            rows.append({"seq": s, "pos": pos, "targets": targets})

    merged = merged_model(name, case, adapter, untie=tied)
    record = {
        "model": name, "r": case["r"], "lora_alpha": case["lora_alpha"],
        "target_modules": case["target_modules"], "base_tied": tied,
        "saved_config_tie_word_embeddings": bool(merged.config.tie_word_embeddings),
    }
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single"
        merged.save_pretrained(str(single))
        files = sorted(p.name for p in single.iterdir())
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files, files
        record["header"] = read_header(single / "model.safetensors")
        record["tensors"] = tensor_summaries(single, gen)
        if name == SHARD_MODEL:
            sharded = Path(tmp) / "sharded"
            merged.save_pretrained(str(sharded), max_shard_size=SHARD_BYTES)
            index = json.loads((sharded / "model.safetensors.index.json").read_text(encoding="utf-8"))
            record["sharded"] = {
                "max_shard_size": SHARD_BYTES,
                "files": sorted(p.name for p in sharded.iterdir() if p.suffix == ".safetensors"),
                "index": index,
            }
    record["sequences"] = seqs
    record["rows"] = rows
    record["logprobs"] = logprobs(merged, seqs, rows)

    if tied:
        # PEFT's merge on the tied model as stored: both deltas go into the shared matrix.
        peft_tied = merged_model(name, case, adapter, untie=False)
        still_tied = (peft_tied.lm_head.weight.data_ptr()
                      == peft_tied.model.embed_tokens.weight.data_ptr())
        lp = logprobs(peft_tied, seqs, rows)
        record["peft_tied_merge"] = {
            "stays_tied": bool(still_tied),
            "max_abs_logprob_diff": max(abs(a - b) for a, b in zip(lp, record["logprobs"])),
        }
    return record


def check_export(folder: Path, name: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    ref = json.loads((OUT / f"{name}.json").read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", attn_implementation="eager").eval()
    lp = logprobs(model, ref["sequences"], ref["rows"])
    worst = max(abs(a - b) for a, b in zip(lp, ref["logprobs"]))
    print(f"{folder}: transformers log-probs vs the fixture: max |diff| {worst:.3e} "
          f"(tie_word_embeddings {model.config.tie_word_embeddings}, dtype {model.dtype})")
    return 0 if worst <= 1e-4 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--check", action="store_true", help="regenerate in memory, compare with the committed files")
    ap.add_argument("--check-export", type=Path)
    ap.add_argument("--model", default="")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.check_export:
        return check_export(args.check_export, args.model)
    names = NAMES
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for seed, name in enumerate(NAMES):
        if name not in names:
            continue
        record = generate(name, seed)
        text = json.dumps(record, indent=1) + "\n"
        if args.check:
            path = OUT / f"{name}.json"
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            tmp = OUT / f"{name}.json.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, OUT / f"{name}.json")
        extra = ""
        if "peft_tied_merge" in record:
            p = record["peft_tied_merge"]
            extra = f"; PEFT on the tied model: stays tied {p['stays_tied']}, |Δ log p| up to {p['max_abs_logprob_diff']:.3f}"
        print(f"{name}: {len(record['tensors'])} tensors, {len(record['logprobs'])} log-probs{extra}",
              file=sys.stderr)
    if stale:
        print(f"differs from the committed fixture: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
