#!/usr/bin/env python3
"""Writes fixtures/train/dpo_examples.json: DPO training examples exactly as TRL 1.16 builds them.

Everything recorded comes out of TRL's and transformers' own code, run here on the CPU:

- `DPOTrainer(...)` is constructed for real (fixtures/models/llama-tiny, fixtures/tokenizer), so
  `_prepare_dataset` runs as it does in training: `add_eos`, the `tokenize_fn` closure
  (prompt and prompt+completion tokenized, split at their common prefix, the minimum over
  chosen and rejected) and the keep_start filter that drops rows whose prompt alone reaches
  `max_length`. The kept rows' `prompt_ids` / `chosen_ids` / `rejected_ids` are read back from
  `trainer.train_dataset`.
- Batches come from `trainer.get_train_dataloader()` with `train_sampling_strategy="sequential"`,
  i.e. through `DataCollatorForPreference` (concatenation [chosen..., rejected...], truncation
  keep_start / keep_end, right padding, completion_mask).
- For each batch, `trainer.compute_loss` runs in train mode; a forward pre-hook on the policy
  records the `labels` TRL passes to the model (input_ids masked where completion_mask == 0;
  the fused LM head scores position t against labels[t + 1]), and `_total_train_tokens` gives
  the `num_tokens` the batch adds.
- Step counts come from a plain `transformers.Trainer` run (`trainer.train()` on a one-parameter
  model): a callback records every optimizer step's micro-batches and `state.epoch`, and
  `state.max_steps` is the total.

The DPO-time wrapper (`###질문:\n{question}\n\n###답변:\n`) is not part of TRL: the reference
workflow applied it to the dataset's prompts before building the trainer, and so does this
script (the f-string below), recording the unwrapped text.

Run with the Python that has torch 2.11, transformers 5.17, trl 1.16 and datasets:

    /tmp/tvenv/bin/python tools/gen_dpo_examples_fixtures.py          # writes the file
    /tmp/tvenv/bin/python tools/gen_dpo_examples_fixtures.py --check  # fails if it differs

Deterministic: no random numbers reach the recorded values (the step-count runs record
micro-batch sizes, not the shuffled indices).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
OUT = FIXTURES / "train" / "dpo_examples.json"
TOKENIZER_DIR = FIXTURES / "tokenizer"
MODEL_DIR = FIXTURES / "models" / "llama-tiny"

WRAPPER = "###질문:\n{question}\n\n###답변:\n"


def wrap(question: str) -> str:
    # The reference workflow's DPO-time wrapper, as its notebook writes it.
    return f"###질문:\n{question}\n\n###답변:\n"


KOREAN_PROMPT = (
    "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n"
    "###지시사항:\n자동차 보험의 대인배상이란 무엇인가요?\n\n###답변:\n"
)
LONG_ENGLISH = (
    "Insurance premiums depend on many factors such as age, driving history, the value of the car, "
    "where it is parked at night, how far it is driven every year, and which optional covers the "
    "policy holder chooses when the contract is signed or renewed."
)
LONG_KOREAN = (
    "보험료는 나이, 운전 경력, 차량 가액, 주차 장소, 연간 주행 거리, 그리고 계약 시 선택한 특약에 따라 "
    "달라지며 갱신할 때마다 다시 계산됩니다. 사고 이력이 있으면 할증이 붙고 무사고 기간이 길면 할인됩니다."
)


def base_rows() -> list[dict]:
    """Rows shared by every configuration (prompt / chosen / rejected, unwrapped)."""
    return [
        # plain English, completions starting with a space
        {"prompt": "Question: What is the capital of France?\nAnswer:", "chosen": " Paris.", "rejected": " Lyon, I think."},
        # the reference workflow's Korean template
        {"prompt": KOREAN_PROMPT, "chosen": "사고로 다른 사람을 다치게 했을 때 보상하는 담보입니다.", "rejected": "잘 모르겠습니다."},
        # chosen already ends with the EOS string: TRL does not add a second one
        {"prompt": "Is the sky blue?", "chosen": " Yes.<eos>", "rejected": " No."},
        # rejected holds the EOS string in the middle and at its end
        {"prompt": "Say two words.", "chosen": " Hello world.", "rejected": " Hello<eos> world<eos>"},
        # prompt ending in a space: ' ' + 'yes' merges across the boundary for chosen, not for
        # rejected ('\n' starts a new pre-token), so the split is the minimum of the two
        {"prompt": "Answer yes or no: ", "chosen": "yes", "rejected": "\nno"},
        # the same with the roles swapped: here rejected's shorter prefix decides
        {"prompt": "Answer yes or no: ", "chosen": "\nYes.", "rejected": "no"},
        # a Korean prompt ending mid-word: '보험' + '료' re-merges in rejected only
        {"prompt": "다음 달 보험", "chosen": " 그렇습니다.", "rejected": "료는 모릅니다."},
        # a long chosen: cut by max_length (keep_start loses its end and the EOS)
        {"prompt": "Why do premiums differ?", "chosen": " " + LONG_ENGLISH, "rejected": " They just do."},
        # a long Korean rejected
        {"prompt": "보험료는 어떻게 정해지나요?", "chosen": " 여러 요인으로 정해집니다.", "rejected": " " + LONG_KOREAN},
        # a prompt that alone exceeds max_length: dropped under keep_start, kept under keep_end
        {"prompt": LONG_ENGLISH + "\nSummarise:", "chosen": " Many factors.", "rejected": " Age only."},
        # emoji (4-byte UTF-8) and mixed scripts
        {"prompt": "이모지로 답하세요: 좋아요?", "chosen": " 👍 좋아요!", "rejected": " 👎 no"},
        # an empty prompt: only <bos> precedes the completion
        {"prompt": "", "chosen": "Hello there.", "rejected": "Go away."},
    ]


def prompt_of_length(tok, n: int, text: str) -> str:
    """The shortest prefix of `text` whose tokenization (with <bos>) has exactly n ids."""
    for k in range(1, len(text) + 1):
        if len(tok(text[:k])["input_ids"]) == n:
            return text[:k]
    raise SystemExit(f"no prefix tokenizes to exactly {n} ids; change the corpus")


def boundary_rows(tok, max_length: int) -> list[dict]:
    """A prompt of exactly max_length - 1 ids (kept: one completion token fits under keep_start)
    and one of exactly max_length ids (dropped under keep_start)."""
    text = LONG_ENGLISH + " " + LONG_ENGLISH
    return [
        {"prompt": prompt_of_length(tok, max_length - 1, text), "chosen": " Fine.", "rejected": " Bad."},
        {"prompt": prompt_of_length(tok, max_length, text), "chosen": " Fine.", "rejected": " Bad."},
    ]


# (name, max_length, truncation_mode, wrapper applied, per_device_train_batch_size)
CONFIGS = [
    ("keep_start", 40, "keep_start", False, 4),
    ("keep_end", 40, "keep_end", False, 4),
    ("wrapper", 64, "keep_start", True, 3),
    ("no_max_length", None, "keep_start", False, 5),
]

# (rows, per_device_train_batch_size, gradient_accumulation_steps, num_train_epochs, max_steps)
STEP_SETTINGS = [
    (10, 3, 2, 3.0, -1),   # 4 batches, 2 steps/epoch
    (10, 3, 3, 1.5, -1),   # last window of each epoch has 1 batch; 1.5 epochs -> 3 steps
    (7, 2, 4, 1.0, -1),    # one window of 4 batches per epoch
    (10, 1, 1, 1.1, -1),   # fractional epochs: 11 steps, the second epoch stops after one
    (25, 1, 1, 0.28, -1),  # 0.28 * 25 = 7.000000000000001 in f64: ceil gives 8, not 7
    (5, 2, 1, 3.0, 7),     # max_steps wins: 3 steps/epoch, 7 steps over 3 epochs
    (20, 4, 8, 2.0, -1),   # accumulation longer than the epoch: 1 step of 5 batches per epoch
    (3, 8, 4, 1.0, -1),    # batch larger than the data
    (10, 2, 2, 0.3, -1),   # 3 steps/epoch; ceil(0.9) = 1 step
    (9, 3, 1, 2.0, 4),     # max_steps below the epoch count's 6
]


def quiet():
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def dpo_case(name, max_length, truncation_mode, wrapped, batch_size, tok, tmp):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = base_rows()
    if max_length is not None:
        rows += boundary_rows(tok, max_length)
    trl_rows = [
        {"prompt": wrap(r["prompt"]) if wrapped else r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in rows
    ]
    # Remember which input row each kept example came from.
    for i, r in enumerate(trl_rows):
        r["row"] = i

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(Path(tmp) / name),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=max_length,
        truncation_mode=truncation_mode,
        per_device_train_batch_size=batch_size,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(trl_rows), processing_class=tok)

    kept = trainer.train_dataset
    examples = [
        {"row": ex["row"], "prompt_ids": ex["prompt_ids"], "chosen_ids": ex["chosen_ids"], "rejected_ids": ex["rejected_ids"]}
        for ex in kept
    ]
    kept_rows = {e["row"] for e in examples}
    dropped = [i for i in range(len(rows)) if i not in kept_rows]

    captured = []

    def record_labels(module, args_, kwargs):
        captured.append(kwargs["labels"].tolist())

    hook = trainer.model.register_forward_pre_hook(record_labels, with_kwargs=True)
    batches = []
    position = 0
    for batch in trainer.get_train_dataloader():
        n = batch["input_ids"].shape[0] // 2
        captured.clear()
        trainer.model.train()
        before = trainer._total_train_tokens
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        if len(captured) != 1:
            raise SystemExit(f"{name}: expected one policy forward per batch, saw {len(captured)}")
        batches.append(
            {
                "examples": list(range(position, position + n)),
                "input_ids": batch["input_ids"].tolist(),
                "attention_mask": batch["attention_mask"].tolist(),
                "completion_mask": batch["completion_mask"].tolist(),
                "labels": captured[0],
                "num_tokens": int(trainer._total_train_tokens - before),
            }
        )
        position += n
    hook.remove()
    if position != len(examples):
        raise SystemExit(f"{name}: the dataloader yielded {position} examples, the dataset has {len(examples)}")

    return {
        "name": name,
        "max_length": max_length,
        "truncation_mode": truncation_mode,
        "wrapper": wrapped,
        "batch_size": batch_size,
        "pad_token_id": trainer.data_collator.pad_token_id,
        "rows": rows,
        "examples": examples,
        "dropped_rows": dropped,
        "batches": batches,
    }


def step_case(rows, batch, accum, epochs, max_steps, tmp):
    import torch
    from torch import nn
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            seen.append(idx.tolist())
            return {"loss": (self.w * idx.float()).sum()}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return rows

        def __getitem__(self, i):
            return {"idx": i}

    seen: list[list[int]] = []
    steps: list[dict] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"micro_batches": [len(b) for b in seen], "indices": [list(b) for b in seen], "epoch": state.epoch})
            seen.clear()

    args = TrainingArguments(
        output_dir=str(Path(tmp) / f"steps-{rows}-{batch}-{accum}"),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        num_train_epochs=epochs,
        max_steps=max_steps,
        save_strategy="no",
        logging_strategy="no",
        learning_rate=0.0,
        seed=0,
        dataloader_num_workers=0,
    )
    collate = lambda feats: {"idx": torch.tensor([f["idx"] for f in feats])}  # noqa: E731
    trainer = Trainer(model=One(), args=args, train_dataset=Data(), data_collator=collate, callbacks=[Record()])
    trainer.train()
    if seen:
        raise SystemExit(f"steps {rows}/{batch}/{accum}: micro-batches after the last optimizer step")

    # The recorded structure must be what the indices say: every full epoch is a permutation.
    per_epoch = -(-(-(-rows // batch)) // accum)  # ceil(ceil(rows / batch) / accum)
    for e in range(len(steps) // per_epoch):
        idx = sorted(i for s in steps[e * per_epoch : (e + 1) * per_epoch] for b in s["indices"] for i in b)
        if idx != list(range(rows)):
            raise SystemExit(f"steps {rows}/{batch}/{accum}: epoch {e} is not a permutation")

    return {
        "rows": rows,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "total_steps": trainer.state.max_steps,
        # `epoch_repr`: Python's shortest round-trip text of `state.epoch`, so a reader can
        # compare bit for bit (serde_json's default float parsing is not correctly rounded).
        "steps": [
            {"micro_batches": s["micro_batches"], "epoch": s["epoch"], "epoch_repr": repr(s["epoch"])}
            for s in steps
        ],
    }


def dpo_config_defaults() -> dict:
    from trl import DPOConfig

    with tempfile.TemporaryDirectory() as d:
        c = DPOConfig(output_dir=d, use_cpu=True)
        return {
            "max_length": c.max_length,
            "truncation_mode": c.truncation_mode,
            "pad_to_multiple_of": c.pad_to_multiple_of,
            "per_device_train_batch_size": c.per_device_train_batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "num_train_epochs": c.num_train_epochs,
            "max_steps": c.max_steps,
            "dataloader_drop_last": c.dataloader_drop_last,
            "train_sampling_strategy": c.train_sampling_strategy,
        }


def build() -> dict:
    quiet()
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [dpo_case(*c, tok, tmp) for c in CONFIGS]
        steps = [step_case(*s, tmp) for s in STEP_SETTINGS]
    return {
        "generator": "tools/gen_dpo_examples_fixtures.py",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "datasets": datasets.__version__,
        },
        "tokenizer": "tokenizer",
        "wrapper": WRAPPER,
        "dpo_config_defaults": dpo_config_defaults(),
        "cases": cases,
        "step_counts": steps,
    }


def dumps(obj) -> str:
    """Indented JSON with every innermost list of numbers on one line (ids stay readable)."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    flat = lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]"  # noqa: E731
    return re.sub(r"\[\s+([-0-9.e, \n]+?)\s+\]", flat, text) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="rebuild in memory and compare with the committed file")
    args = ap.parse_args()
    text = dumps(build())
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            sys.exit(f"{OUT} differs from a fresh build")
        print(f"ok: {OUT} matches")
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
