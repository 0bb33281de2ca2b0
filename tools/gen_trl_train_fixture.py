#!/usr/bin/env python3
"""A whole DPO run by TRL 1.16 + PEFT 0.21 on the CPU: the reference for `prefer train`.

fixtures/train/trl_run/:
- rows.jsonl: the preference rows (prompt / chosen / rejected text, English and Korean);
- init/: the LoRA adapter TRL starts from (PEFT's own initialisation, then every B set to
  seeded random values so the first steps already move every tensor), saved before training;
- final/: the adapter after training;
- run.json: the DPOConfig used and `trainer.state.log_history` (TRL's logged metrics per
  step).

The run is made order-independent so our seeded shuffle and torch's sampler cannot differ:
every step's batch is the whole dataset (per_device_train_batch_size = the row count), with
gradient accumulation 1; dropout is 0. The model is fixtures/models/<model> in float32 with
eager attention. Deterministic (fixed seeds, one thread):

    python tools/gen_trl_train_fixture.py [--model llama-tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "fixtures" / "train" / "trl_run"
# The reference workflow's targets but lm_head: TRL 1.16 refuses LoRA on lm_head (its fused
# log-prob path reads lm_head.weight directly). prefer trains it (crates/model/tests/lora_grads.rs).
TARGETS = ["embed_tokens", "q_proj", "k_proj", "v_proj", "gate_proj", "down_proj", "up_proj"]

ROWS = [
    ("Question: what is two plus two?\nAnswer:", " Four.", " Five, probably."),
    ("Name a colour of the sky.", " Blue.", " The sky has no colour at all."),
    ("아래는 문제를 설명하는 지시사항입니다.\n\n###지시사항:\n인사를 해주세요.\n\n###답변:\n", "안녕하세요!", "싫어요."),
    ("Write a number between 1 and 3.", " 2", " 7"),
    ("Translate 'cat' to Korean.", " 고양이", " 개"),
    ("Is water wet? Answer yes or no.", " Yes.", " Maybe, it depends on many things."),
]

CONFIG = dict(
    beta=0.1, learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.05,
    max_steps=6, logging_steps=1, max_grad_norm=1.0, max_length=48, seed=7,
    per_device_train_batch_size=len(ROWS), gradient_accumulation_steps=1,
)
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-tiny")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_dir = REPO / "fixtures" / "models" / args.model
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    tmp = OUT.with_name("trl_run.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in ROWS])
    with open(tmp / "rows.jsonl", "w", encoding="utf-8") as f:
        for p, c, r in ROWS:
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n")
    cfg = DPOConfig(output_dir=str(tmp / "trainer_out"), report_to="none", save_strategy="no", use_cpu=True,
                    bf16=False, fp16=False, dataloader_num_workers=0, **CONFIG)
    # TRL wraps the base itself (a new adapter): its reference is then the base with the
    # adapter disabled, as in the reference workflow. (Handing it a PeftModel instead makes it
    # copy the adapter as the reference.)
    trainer = DPOTrainer(model=base, args=cfg, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(target_modules=TARGETS, bias="none", task_type="CAUSAL_LM", **LORA))
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_embedding_A" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    trainer.model.save_pretrained(str(tmp / "init"), save_embedding_layers=False)
    trainer.train()
    trainer.model.save_pretrained(str(tmp / "final"), save_embedding_layers=False)
    shutil.rmtree(tmp / "trainer_out", ignore_errors=True)
    run = {"model": args.model, "config": CONFIG, "lora": dict(LORA, target_modules=TARGETS),
           "log_history": trainer.state.log_history}
    (tmp / "run.json").write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    if OUT.exists():
        shutil.rmtree(OUT)
    os.replace(tmp, OUT)
    for entry in trainer.state.log_history:
        print({k: entry[k] for k in ("step", "loss", "grad_norm", "learning_rate") if k in entry}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
