#!/usr/bin/env python3
"""AdamW, gradient clipping, learning-rate schedules and the weight-decay rule, as torch 2.11 and
transformers 5.17 compute them: fixtures/train/optim.json.

Why: `prefer train` replaces transformers' Trainer (inside TRL's DPOTrainer). Its optimizer
step must be torch.optim.AdamW's, its clipping torch.nn.utils.clip_grad_norm_'s, its
learning rate transformers' `get_scheduler`'s, and its split of parameters into a decayed and
an undecayed group `Trainer.get_decay_parameter_names`'. crates/train/tests/optim.rs replays
what this script records.

What it records (field by field in fixtures/README.md, section "train/optim.json"):

- `decay_rule`: names of parameters of a module tree built from those dotted names, and
  whether `Trainer.get_decay_parameter_names` puts each in the decayed group (bias and norm
  weights are excluded by name; plain nn.Module containers, so no nn.LayerNorm type match).
- `run`: six small parameters (LoRA A/B weights, an embedding LoRA A, a bias and two norm
  weights), 30 optimizer steps as the Trainer takes them: seeded random gradients (scaled so
  some steps are clipped and some are not; step 7 has an all-zero gradient for one tensor),
  `clip_grad_norm_(params, 1.0)` (its return value is TRL's `grad_norm`), `AdamW.step()`
  with the learning rate `get_scheduler("linear", warmup 5, total 30)` gives that step, then
  `scheduler.step()`. Parameters after every step, the optimizer state (exp_avg, exp_avg_sq)
  after steps 15 and 30.
- `schedules`: for each scheduler type and setting, the learning rate each optimizer step k
  (0-based) uses — `get_last_lr()` before the k-th `scheduler.step()` — for k past the end of
  training, so clamping after `num_training_steps` is covered.
- `warmup_steps`: `TrainingArguments.get_warmup_steps(total)` for integer counts and ratios
  (a value >= 1 is truncated to an integer; a ratio r < 1 becomes ceil(total·r) computed in
  f64, so 100·0.07 = 7.000000000000001 rounds up to 8).

Deterministic: CPU, one thread, fixed seeds. Floats are written with Python's repr, so the f32
values read back exactly. Run from anywhere with torch 2.11 + transformers 5.17 (on the CPU
machine: /tmp/tvenv/bin/python):

    python tools/gen_optim_fixtures.py           # writes fixtures/train/optim.json
    python tools/gen_optim_fixtures.py --check   # fails if the committed file differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "fixtures" / "train" / "optim.json"

# Names whose decay-group membership is recorded: PEFT LoRA names, Llama/Gemma-2 norm names,
# biases, and near misses of the name patterns ("normalizer", "abnorm", "biased").
DECAY_RULE_NAMES = [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
    "base_model.model.model.embed_tokens.lora_embedding_A.default",
    "base_model.model.lm_head.lora_B.default.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.pre_feedforward_layernorm.weight",
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.attn.biased_proj.weight",
    "model.layers.0.mlp.normalizer.weight",
    "model.layers.0.mlp.abnorm.weight",
    "model.layers.0.RMSNorm.weight",
    "model.norm.weight",
    "model.ln_f.weight",
    "scale.norm",
    "norm",
    "enormous.weight",
]

# The replayed run: (name, shape). Two decayed LoRA weights and a decayed embedding LoRA A,
# an undecayed bias and two undecayed norm weights.
RUN_PARAMS = [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", [4, 6]),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", [5, 4]),
    ("base_model.model.model.embed_tokens.lora_embedding_A.default", [4, 7]),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", [5]),
    ("base_model.model.model.layers.0.input_layernorm.weight", [6]),
    ("base_model.model.model.norm.weight", [6]),
]
RUN = {
    "lr": 1e-2,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.05,
    "max_grad_norm": 1.0,
    "scheduler": "linear",
    "warmup_steps": 5,
    "total_steps": 30,
}
# Gradient scales cycle so the total norm lands below and above max_grad_norm.
GRAD_SCALES = [0.03, 0.2, 0.6]
ZERO_GRAD_STEP, ZERO_GRAD_PARAM = 7, 1
STATE_AFTER = [15, 30]

# (name, warmup_steps, total_steps, scheduler_specific_kwargs, steps to record)
SCHEDULES = [
    ("linear", 5, 30, {}, 35),
    ("linear", 0, 10, {}, 12),
    ("linear", 12, 10, {}, 14),
    ("cosine", 5, 30, {}, 35),
    ("cosine", 3, 20, {"num_cycles": 2.0}, 24),
    ("constant", 0, 10, {}, 12),
    ("constant_with_warmup", 4, 10, {}, 12),
    ("cosine_with_min_lr", 5, 30, {"min_lr_rate": 0.1}, 35),
    ("cosine_with_min_lr", 5, 30, {"min_lr": 1e-3}, 35),
    ("cosine_with_min_lr", 0, 7, {"min_lr_rate": 0.25, "num_cycles": 1.0}, 9),
]
SCHEDULE_BASE_LR = 1e-2

# (warmup_steps as TrainingArguments takes it, total steps)
WARMUP_ARGS = [(0, 30), (5, 30), (5.7, 30), (0.1, 30), (0.05, 30), (0.33, 7), (0.07, 100), (0.999, 10), (1, 10)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def module_tree(names_shapes):
    """An nn.Module whose named_parameters() are exactly `names_shapes` (plain containers)."""
    import torch
    from torch import nn

    root = nn.Module()
    for name, shape in names_shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    got = [n for n, _ in root.named_parameters()]
    if sorted(got) != sorted(n for n, _ in names_shapes):
        raise RuntimeError(f"module tree names differ: {got}")
    return root


def decay_names(model) -> set[str]:
    from transformers import Trainer

    # The method reads nothing from `self`.
    return set(Trainer.get_decay_parameter_names(None, model))


def flat(t) -> list[float]:
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def decay_rule():
    model = module_tree([(n, [1]) for n in DECAY_RULE_NAMES])
    decayed = decay_names(model)
    return [{"name": n, "decay": n in decayed} for n in DECAY_RULE_NAMES]


def replay_run():
    import torch
    from transformers import get_scheduler

    model = module_tree(RUN_PARAMS)
    gen = torch.Generator().manual_seed(20240611)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, _ in RUN_PARAMS:
            p = params[name]
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    init = {name: flat(params[name]) for name, _ in RUN_PARAMS}

    decayed = decay_names(model)
    # Trainer.create_optimizer's grouping.
    groups = [
        {"params": [params[n] for n, _ in RUN_PARAMS if n in decayed], "weight_decay": RUN["weight_decay"]},
        {"params": [params[n] for n, _ in RUN_PARAMS if n not in decayed], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=RUN["lr"], betas=tuple(RUN["betas"]), eps=RUN["eps"])
    sched = get_scheduler(RUN["scheduler"], opt, num_warmup_steps=RUN["warmup_steps"],
                          num_training_steps=RUN["total_steps"])

    steps, states = [], []
    for k in range(RUN["total_steps"]):
        scale = GRAD_SCALES[k % len(GRAD_SCALES)]
        grads = []
        for i, (name, shape) in enumerate(RUN_PARAMS):
            g = scale * torch.randn(shape, generator=gen)
            if k == ZERO_GRAD_STEP and i == ZERO_GRAD_PARAM:
                g = torch.zeros(shape)
            params[name].grad = g.clone()
            grads.append(flat(g))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), RUN["max_grad_norm"])
        lr = sched.get_last_lr()[0]
        if opt.param_groups[0]["lr"] != lr:
            raise RuntimeError("scheduler and optimizer disagree on the learning rate")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append({
            "grads": grads,
            "grad_norm": float(grad_norm),
            "clipped_grads": None,  # filled below
            "lr": lr,
            "params": [flat(params[n]) for n, _ in RUN_PARAMS],
        })
        if k + 1 in STATE_AFTER:
            st = [opt.state[params[n]] for n, _ in RUN_PARAMS]
            states.append({
                "after_step": k + 1,
                "step": [float(s["step"]) for s in st],
                "exp_avg": [flat(s["exp_avg"]) for s in st],
                "exp_avg_sq": [flat(s["exp_avg_sq"]) for s in st],
            })

    # The clipped gradients, recomputed separately (the run above leaves none behind).
    for k, step in enumerate(steps):
        gs = [torch.tensor(g).reshape(shape) for g, (_, shape) in zip(step["grads"], RUN_PARAMS)]
        ps = [torch.nn.Parameter(torch.zeros(shape)) for _, shape in RUN_PARAMS]
        for p, g in zip(ps, gs):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(ps, RUN["max_grad_norm"])
        step["clipped_grads"] = [flat(p.grad) for p in ps]

    return {
        **RUN,
        "params": [
            {"name": n, "shape": s, "decay": n in decayed, "init": init[n]} for n, s in RUN_PARAMS
        ],
        "steps": steps,
        "states": states,
    }


def schedules():
    import torch
    from transformers import get_scheduler

    out = []
    for name, warmup, total, kwargs, n in SCHEDULES:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=SCHEDULE_BASE_LR)
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=dict(kwargs))
        lrs = []
        for _ in range(n):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        out.append({"name": name, "base_lr": SCHEDULE_BASE_LR, "warmup_steps": warmup,
                    "total_steps": total, "kwargs": kwargs, "lrs": lrs})
    return out


def warmup_steps():
    from transformers import TrainingArguments

    out = []
    for w, total in WARMUP_ARGS:
        args = TrainingArguments(output_dir="/tmp/unused-gen-optim", warmup_steps=w, report_to=[])
        out.append({"warmup_steps": w, "total_steps": total, "steps": args.get_warmup_steps(total)})
    return out


def build() -> str:
    import torch
    import transformers

    torch.set_num_threads(1)
    doc = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decay_rule": decay_rule(),
        "run": replay_run(),
        "schedules": schedules(),
        "warmup_steps": warmup_steps(),
    }
    # One line per top-level field and per replayed step keeps the file small and diffable.
    lines = ["{"]
    for i, (key, value) in enumerate(doc.items()):
        comma = "," if i + 1 < len(doc) else ""
        if key == "run":
            head = {k: v for k, v in value.items() if k != "steps"}
            body = ",\n".join("  " + compact(s) for s in value["steps"])
            lines.append(f' "run": {compact(head)[:-1]}, "steps": [\n{body}\n ]}}{comma}')
        else:
            lines.append(f" {json.dumps(key)}: {compact(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = ap.parse_args()
    text = build()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            log(f"{OUT} differs from what this script generates")
            return 1
        log(f"{OUT} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    log(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
