#!/usr/bin/env python3
"""The DPO baseline: TRL 1.16 + PEFT 0.21 on one GPU, timed per optimizer step.

LoRA (r, alpha, dropout, targets as given) on a bf16 model (sdpa attention), reference = the
base with the adapter disabled (TRL's default for a fresh adapter), gradient checkpointing,
bf16, AdamW, `max_steps` steps of `batch` pairs; prints one JSON line with the step times
(a TrainerCallback's on_step_end), their median over the steps after the first two, and the
peak GPU memory.

    python3 bench/gpu/dpo_trl.py MODEL_DIR ROWS.jsonl --batch 8 --steps 10 --max-length 1024
"""
import argparse
import json
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self.last = [], None

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.last)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("rows")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--out", default="/tmp/dpo-trl-out")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    data = load_dataset("json", data_files=args.rows, split="train")
    cfg = DPOConfig(output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    max_steps=args.steps, learning_rate=1e-5, bf16=True,
                    gradient_checkpointing=not args.no_gradient_checkpointing,
                    max_length=args.max_length, logging_steps=1, save_strategy="no", report_to="none",
                    beta=0.1, dataloader_num_workers=0)
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=args.targets.split(","), bias="none", task_type="CAUSAL_LM")
    timer = StepTimes()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = sorted(timer.times[2:]) or sorted(timer.times)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({"step_s": timer.times, "median_step_s": steady[len(steady) // 2],
                      "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                      "num_tokens": trainer.state.log_history[-2].get("num_tokens"),
                      "losses": losses}))


if __name__ == "__main__":
    main()
