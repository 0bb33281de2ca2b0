#!/usr/bin/env python3
"""A LoRA adapter folder as PEFT 0.21 writes it, and what PEFT's adapter_config.json holds for
a few settings: fixtures/train/peft/.

Why: `prefer train` writes adapters that `PeftModel.from_pretrained` and vLLM must load, and
reads adapters PEFT wrote. crates/train/tests/peft.rs reads this folder with our reader,
round-trips it through our writer, and compares our adapter_config.json with PEFT's.

What it writes (field by field in fixtures/README.md, section "train/peft/"):

- `adapter/`: `get_peft_model(llama-tiny, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
  target_modules=<the reference workflow's 8 modules>, task_type="CAUSAL_LM"))`, then every
  `lora_B` and the embedding's `lora_embedding_A` (zero after PEFT's initialisation) set to
  seeded normal values so the file is non-trivial, then `save_pretrained` (PEFT's README.md
  model card removed). Because embed_tokens and lm_head are targeted, PEFT also dumps the full
  base embedding and head (`*.base_layer.weight`): our reader must skip them.
  `base_model_name_or_path` is `fixtures/models/llama-tiny` (the script runs at the
  repository root).
- `forward.json`: the PEFT model's forward (eval mode, f32, eager attention, CPU) on a few ids,
  and the base model's (adapter disabled) on the same ids — for the model-side LoRA tests.
- `configs.json`: for several LoraConfig settings, the adapter_config.json PEFT writes
  (parsed; `inference_mode` true and `base_model_name_or_path` set, as
  `PeftModel.save_pretrained` does before it calls `LoraConfig.save_pretrained`), and the exact text PEFT's writer (`json.dumps(indent=2, sort_keys=True)`, no
  final newline) produces once `target_modules` is in prefer's canonical order and
  `base_model_name_or_path` is "BASE": PEFT writes `list(set)`, whose order depends on
  Python's string hashing, so only the set is PEFT's.

Deterministic: the script re-executes itself with PYTHONHASHSEED=0 (a fixed target_modules
order), one CPU thread, fixed seeds. Run from anywhere with torch 2.11 + transformers 5.17 +
peft 0.21 (on the CPU machine: /tmp/tvenv/bin/python):

    python tools/gen_peft_fixture.py           # writes fixtures/train/peft/
    python tools/gen_peft_fixture.py --check   # fails if a committed file differs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "fixtures" / "train" / "peft"
BASE = "fixtures/models/llama-tiny"

# The reference workflow's LoRA targets (GUIDE §1).
TARGETS = ["embed_tokens", "q_proj", "k_proj", "v_proj", "gate_proj", "down_proj", "up_proj", "lm_head"]
# prefer's canonical module order (model::LoraTarget::ALL) — how our writer lists them.
CANONICAL = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj", "lm_head"]
ADAPTER = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": TARGETS}
CONFIG_CASES = [
    ADAPTER,
    {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": TARGETS},
    {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
     "use_rslora": True},
    {"r": 2, "lora_alpha": 0.5, "lora_dropout": 0.1, "target_modules": ["lm_head"]},
]
FORWARD_IDS = [2, 17, 503, 999, 42, 7, 1002, 1005, 250, 1]
B_STD, EMBED_A_STD = 0.1, 0.05


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lora_config(case: dict):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", bias="none", **case)


def build_adapter(folder: Path) -> dict:
    """Writes the adapter into `folder`; returns forward.json's content."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, lora_config(ADAPTER))
    gen = torch.Generator().manual_seed(5678)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(B_STD * torch.randn(p.shape, generator=gen))
            elif ".lora_embedding_A." in name:
                p.copy_(EMBED_A_STD * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)

    model.eval()
    ids = torch.tensor([FORWARD_IDS])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits[0]
    lp = torch.log_softmax(logits.double(), dim=-1)
    base_lp = torch.log_softmax(base_logits.double(), dim=-1)
    nxt = ids[0, 1:]
    t = len(FORWARD_IDS)
    logprobs = lp[torch.arange(t - 1), nxt].tolist()
    base_logprobs = base_lp[torch.arange(t - 1), nxt].tolist()
    return {
        "base_model": BASE,
        "adapter": "train/peft/adapter",
        "scaling": ADAPTER["lora_alpha"] / ADAPTER["r"],
        "ids": FORWARD_IDS,
        "logprobs": logprobs,
        "argmax": logits.argmax(dim=-1).tolist(),
        "mean_logit": logits.double().mean(dim=-1).tolist(),
        "base_logprobs": base_logprobs,
        "max_abs_delta_logprob": max(abs(a - b) for a, b in zip(logprobs, base_logprobs)),
    }


def config_cases() -> list[dict]:
    out = []
    for case in CONFIG_CASES:
        cfg = lora_config(case)
        cfg.base_model_name_or_path = BASE
        cfg.inference_mode = True  # as PeftModel.save_pretrained sets it while saving
        with tempfile.TemporaryDirectory() as tmp:
            cfg.save_pretrained(tmp)
            text = Path(tmp, "adapter_config.json").read_text()
        saved = json.loads(text)
        if set(saved["target_modules"]) != set(case["target_modules"]):
            raise RuntimeError(f"PEFT wrote target_modules {saved['target_modules']}")
        ours = dict(saved)
        ours["target_modules"] = [m for m in CANONICAL if m in set(case["target_modules"])]
        ours["base_model_name_or_path"] = "BASE"
        # PEFT's own writer call on the reordered dict (LoraConfig.save_pretrained).
        expected_text = json.dumps(ours, indent=2, sort_keys=True)
        out.append({
            "settings": {"use_rslora": False, **case},
            "scaling": case["lora_alpha"] / (math.sqrt(case["r"]) if case.get("use_rslora") else case["r"]),
            "peft": saved,
            "expected_text": expected_text,
        })
    return out


def build(dest: Path) -> None:
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)
    forward = build_adapter(dest / "adapter")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    (dest / "forward.json").write_text(json.dumps({**versions, **forward}, indent=1) + "\n")
    (dest / "configs.json").write_text(json.dumps({**versions, "cases": config_cases()}, indent=1) + "\n")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = ap.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":
        # target_modules is a set in PEFT: fix its iteration order.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    os.chdir(REPO)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".peft-", dir=OUT.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        build(tmp)
        if args.check:
            new, old = files(tmp), files(OUT) if OUT.is_dir() else {}
            bad = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))
            if bad:
                log(f"{OUT} differs from what this script generates: {bad}")
                return 1
            log(f"{OUT} is up to date")
            return 0
        if OUT.exists():
            shutil.rmtree(OUT)
        tmp.rename(OUT)
        log(f"wrote {OUT}: {sorted(files(OUT))}")
        return 0
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
