#!/usr/bin/env python3
"""Record TRL 1.16's DPO losses, gradients and logged metrics: fixtures/train/dpo_losses.json.

prefer's crates/train/src/loss/ re-implements `DPOTrainer._compute_loss` on per-sequence
numbers (summed completion log-probs, token counts, per-sequence sums of the logged
statistics). This script makes TRL itself the truth for it:

- A real `DPOTrainer` is built per configuration (the tiny fixture model
  fixtures/models/llama-tiny and fixtures/tokenizer, a two-row dataset, CPU), so the
  option checks of `DPOConfig` and `DPOTrainer.__init__` are TRL's own.
- Its real `_compute_loss` is then called with a stand-in model: a callable returning,
  per token, `log_probs` (a leaf tensor with `requires_grad`, zero outside the completion
  mask, as TRL's fused LM head returns them), `entropy`, `mean_logits`, `is_top1` and
  `log_sum_sq_probs`. Reference log-probs come in the batch (`precompute_ref_logps` is
  switched on after construction), as `prefer train` passes them.
- `loss.backward()` gives d loss / d (every token's log-prob). Every completion token of a
  sequence gets the same gradient (with `ld_alpha`: one value for the tokens within the
  pair's shared length, one for the tail); the script asserts that and records the
  per-sequence values.
- The metrics TRL appends to `_metrics` for that batch are recorded in their order, and
  "windows" replay several train/eval batches through the real `DPOTrainer.log` to record
  what TRL logs (averages over the window, `eval_` names, the running `num_tokens`).
- "validation" cases record what TRL does with a configuration: accept it, raise (type and
  message), or accept it with a logged warning.

Math runs in float64 (`torch.set_default_dtype(torch.float64)`, so TRL's
`torch.tensor(label_smoothing)` is float64 too), except `alpha_divergence` with a coefficient
other than 1: TRL's clamp table there has no float64 entry, so those cases run in float32
and are marked `"dtype": "float32"`.

Deterministic (fixed seeds, CPU). The output is written to a temporary file and renamed.

Needs: torch 2.11, trl 1.16 (transformers 5.17, datasets). Run from anywhere:

    /tmp/tvenv/bin/python tools/gen_dpo_loss_fixtures.py            # writes the fixture
    /tmp/tvenv/bin/python tools/gen_dpo_loss_fixtures.py --check    # recompute, compare
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "fixtures" / "train" / "dpo_losses.json"
MODEL_DIR = REPO / "fixtures" / "models" / "llama-tiny"
TOKENIZER_DIR = REPO / "fixtures" / "tokenizer"
MAX_BYTES = 300_000

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ALL_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
# label_smoothing each type needs to be valid (exo_pair refuses 0).
NEEDS_LS = {"exo_pair": 1e-3}

def config(**kw) -> dict:
    """A full DPO loss configuration: TRL's defaults overridden by `kw`."""
    c = {
        "loss_type": ["sigmoid"], "loss_weights": None, "beta": 0.1, "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5,
        "discopop_tau": 0.05, "use_weighting": False, "ld_alpha": None,
    }
    for k in kw:
        assert k in c, k
    c.update(kw)
    return c


class Env:
    """The fixture model, tokenizer and dataset every trainer is built from."""

    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        self.model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
        self.dataset = datasets.Dataset.from_dict(
            {"prompt": ["hello there", "a b c"], "chosen": [" yes", " d"], "rejected": [" no", " e"]}
        )
        self._tmp = tempfile.TemporaryDirectory(prefix="dpo-loss-fixtures-")
        self.tmp = self._tmp.name

    def close(self):
        self._tmp.cleanup()

    def trainer(self, cfg: dict) -> DPOTrainer:
        """A real DPOTrainer for `cfg` (raises what TRL raises)."""
        args = DPOConfig(
            output_dir=self.tmp, report_to=[], use_cpu=True, bf16=False,
            logging_steps=1, **cfg,
        )
        with torch.device("cpu"):
            tr = DPOTrainer(model=self.model, args=args, train_dataset=self.dataset,
                            processing_class=self.tokenizer)
        tr.precompute_ref_logps = True  # reference log-probs come in the batch
        tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        tr._total_train_tokens = 0
        return tr


class StandInModel:
    """What TRL's fused LM head returns, from fixed per-token tensors ([2N, T-1] each)."""

    def __init__(self, batch):
        self.b = batch

    def __call__(self, **kwargs):
        b = self.b
        m = b["shift_mask"].to(b["logp"].dtype)
        return SimpleNamespace(
            log_probs=b["logp"] * m,
            entropy=b["entropy"] * m,
            mean_logits=b["mean_logits"] * m,
            is_top1=b["is_top1"] & b["shift_mask"].bool(),
            log_sum_sq_probs=b["lssp"] * m,
            aux_loss=None,
        )


def make_batch(gen: torch.Generator, n: int, dtype, scale: float, ref_noise: float,
               ld_alpha, max_completion: int = 24, log_ratios=None, no_prompt=()) -> dict:
    """N random pairs: rows [chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]. Rows in
    `no_prompt` start with their completion (position 0 has no log-prob)."""
    rows = 2 * n
    prompt = torch.randint(1, 7, (rows,), generator=gen)
    for row in no_prompt:
        prompt[row] = 0
    comp = torch.randint(1, max_completion + 1, (rows,), generator=gen)
    pad = torch.randint(0, 3, (rows,), generator=gen)
    t = int((prompt + comp + pad).max())
    pos = torch.arange(t).unsqueeze(0)
    attention = (pos < (prompt + comp).unsqueeze(1)).long()
    completion = ((pos >= prompt.unsqueeze(1)) & (pos < (prompt + comp).unsqueeze(1))).long()
    shift_mask = completion[:, 1:]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((rows, t - 1), generator=gen, dtype=torch.float64)

    # Per-token log-probs: mostly small, a few very unlikely tokens.
    logp = -(u(0, 1) ** 3) * scale
    logp = logp.to(dtype).requires_grad_(True)
    entropy = u(0.0, 6.0).to(dtype)
    mean_logits = (u(-4.0, 4.0)).to(dtype)
    is_top1 = torch.rand((rows, t - 1), generator=gen) < 0.4
    lssp = u(-4.0, -0.05).to(dtype)

    batch = {
        "logp": logp, "entropy": entropy, "mean_logits": mean_logits, "is_top1": is_top1,
        "lssp": lssp, "shift_mask": shift_mask, "attention": attention, "completion": completion,
    }
    # Reference log-probs as TRL takes them from the batch: near the policy's (LD-weighted)
    # sums, with a per-sequence offset.
    with torch.no_grad():
        seq = policy_logps(batch, ld_alpha)
        noise = ref_noise * torch.randn((rows,), generator=gen, dtype=torch.float64).to(dtype)
        # Chosen log-ratios (policy − reference), when a case needs particular ones.
        ref = seq + noise if log_ratios is None else seq - torch.tensor(log_ratios, dtype=dtype)
    batch["ref"] = ref
    return batch


def ld_masks(shift_mask: torch.Tensor):
    """TRL's LD-DPO split: completion positions within the pair's shared length, and after."""
    comp_pos = shift_mask.cumsum(dim=1)
    lens = shift_mask.sum(dim=1)
    c, r = lens.chunk(2)
    shared = torch.minimum(c, r)
    shared = torch.cat([shared, shared])
    return (comp_pos > 0) & (comp_pos <= shared.unsqueeze(1)), comp_pos > shared.unsqueeze(1)


def policy_logps(batch, ld_alpha):
    lp = batch["logp"] * batch["shift_mask"].to(batch["logp"].dtype)
    if ld_alpha is None:
        return lp.sum(dim=1)
    shared, tail = ld_masks(batch["shift_mask"])
    return (lp * shared).sum(dim=1) + ld_alpha * (lp * tail).sum(dim=1)


def run_inputs(batch) -> dict:
    n = batch["logp"].shape[0] // 2
    return {
        "input_ids": torch.zeros_like(batch["attention"]),
        "attention_mask": batch["attention"],
        "completion_mask": batch["completion"],
        "ref_chosen_logps": batch["ref"][:n],
        "ref_rejected_logps": batch["ref"][n:],
    }


def f(x) -> float:
    return float(x)


def per_sequence(batch, cfg) -> tuple[dict, dict]:
    """The per-sequence numbers prefer's loss layer takes (chosen, rejected)."""
    mask = batch["shift_mask"]
    mf = mask.to(batch["logp"].dtype)
    n = mask.shape[0] // 2
    with torch.no_grad():
        logps = (batch["logp"] * mf).sum(dim=1)
        cols = {
            "logps": logps,
            "ref_logps": batch["ref"],
            "tokens": mask.sum(dim=1),
            "mean_logits": (batch["mean_logits"] * mf).sum(dim=1),
            "entropy": (batch["entropy"] * mf).sum(dim=1),
            "top1": (batch["is_top1"] & mask.bool()).sum(dim=1),
            "attention_tokens": batch["attention"].sum(dim=1),
        }
        if cfg["ld_alpha"] is not None:
            _, tail = ld_masks(mask)
            cols["tail_logps"] = (batch["logp"] * mf * tail).sum(dim=1)
        if cfg["use_weighting"]:
            cols["log_sum_sq_probs"] = (batch["lssp"] * mf).sum(dim=1)
        # ipo and sigmoid_norm count the unshifted completion mask: one more token where a
        # completion starts at position 0.
        mask_tokens = batch["completion"].sum(dim=1)
        if not torch.equal(mask_tokens, cols["tokens"]):
            cols["mask_tokens"] = mask_tokens
    out = []
    for half in (slice(0, n), slice(n, 2 * n)):
        d = {}
        for k, v in cols.items():
            v = v[half]
            d[k] = [int(x) for x in v.tolist()] if k in ("tokens", "mask_tokens", "top1", "attention_tokens") \
                else [f(x) for x in v.tolist()]
        out.append(d)
    return out[0], out[1]


def sequence_grads(batch, cfg) -> dict:
    """d loss / d token log-prob, per sequence (all completion tokens share one value, or
    two with ld_alpha: within the shared length and past it). None where a sequence has no
    such token."""
    g = batch["logp"].grad
    mask = batch["shift_mask"].bool()
    n = mask.shape[0] // 2
    if cfg["ld_alpha"] is None:
        groups = {"": mask}
    else:
        shared, tail = ld_masks(batch["shift_mask"])
        groups = {"": shared & mask, "_tail": tail & mask}
    out = {}
    for suffix, gm in groups.items():
        vals = []
        for row in range(2 * n):
            sel = g[row][gm[row]]
            if sel.numel() == 0:
                vals.append(None)
                continue
            assert torch.all(sel == sel[0]), f"non-uniform token grads in row {row}: {sel}"
            vals.append(f(sel[0]))
        out["chosen" + suffix] = vals[:n]
        out["rejected" + suffix] = vals[n:]
    # Outside the completion, no gradient at all.
    assert torch.all(g[~mask] == 0)
    return out


def compute_case(env: Env, name: str, cfg: dict, seed: int, n: int, scale: float = 3.0,
                 ref_noise: float = 4.0, max_completion: int = 24, log_ratios=None,
                 no_prompt=()) -> dict:
    alpha_f32 = cfg["f_divergence_type"] == "alpha_divergence" and abs(cfg["f_alpha_divergence_coef"] - 1.0) >= 1e-6
    dtype = torch.float32 if alpha_f32 else torch.float64
    torch.set_default_dtype(torch.float32)
    tr = env.trainer(cfg)
    tr.model.train()
    torch.set_default_dtype(dtype)
    try:
        gen = torch.Generator().manual_seed(seed)
        batch = make_batch(gen, n, dtype, scale, ref_noise, cfg["ld_alpha"], max_completion, log_ratios,
                           no_prompt)
        loss = tr._compute_loss(StandInModel(batch), run_inputs(batch), False)
        loss.backward()
    finally:
        torch.set_default_dtype(torch.float32)
    chosen, rejected = per_sequence(batch, cfg)
    return {
        "name": name,
        "dtype": "float32" if alpha_f32 else "float64",
        "config": cfg,
        "chosen": chosen,
        "rejected": rejected,
        "loss": f(loss),
        "grad": sequence_grads(batch, cfg),
        "metrics": [[k, f(v[-1])] for k, v in tr._metrics["train"].items()],
    }


def compute_cases(env: Env) -> list[dict]:
    cases = []
    seed = 1000

    def add(name, cfg, **kw):
        nonlocal seed
        seed += 1
        cases.append(compute_case(env, name, cfg, seed, **kw))

    # Every loss type alone at three betas; batch sizes vary (1 pair included).
    for t in ALL_TYPES:
        ls = NEEDS_LS.get(t, 0.0)
        for beta, n in ((0.1, 4), (0.5, 3), (2.0, 1 if t == "sigmoid" else 5)):
            add(f"{t}_beta{beta}", config(loss_type=[t], beta=beta, label_smoothing=ls), n=n)
    # hinge on both sides of its kink; sigmoid saturated (large margins).
    add("hinge_wide", config(loss_type=["hinge"], beta=0.05), n=6, ref_noise=30.0)
    add("sigmoid_saturated", config(loss_type=["sigmoid"], beta=5.0), n=4, ref_noise=60.0)
    add("discopop_saturated", config(loss_type=["discopop"], beta=1.0), n=4, ref_noise=20.0)
    # label_smoothing where a type reads it (sigmoid ignores it).
    for t, ls in (("robust", 0.1), ("robust", 0.3), ("exo_pair", 0.2), ("exo_pair", 0.5),
                  ("aot", 0.1), ("aot_unpaired", 0.25), ("sigmoid", 0.2)):
        add(f"{t}_ls{ls}", config(loss_type=[t], beta=0.3, label_smoothing=ls), n=4)
    # Completions at position 0 (no prompt): the first token has no log-prob, so ipo's and
    # sigmoid_norm's counts exceed `tokens` by one.
    for t in ("ipo", "sigmoid_norm", "sigmoid"):
        add(f"{t}_no_prompt_rows", config(loss_type=[t], beta=0.3), n=3, max_completion=6,
            no_prompt=(0, 4, 5))
    add("discopop_tau0.5", config(loss_type=["discopop"], beta=0.2, discopop_tau=0.5), n=4)
    # Every f-divergence with every type that allows one.
    for div in ("forward_kl", "js_divergence"):
        for t in F_DIV_TYPES:
            add(f"{t}_{div}", config(loss_type=[t], beta=0.2, f_divergence_type=div,
                                     label_smoothing=NEEDS_LS.get(t, 0.0) or (0.1 if t == "robust" else 0.0)),
                n=3, ref_noise=1.5)
    for t in F_DIV_TYPES:
        add(f"{t}_alpha0.5", config(loss_type=[t], beta=0.2, f_divergence_type="alpha_divergence",
                                    f_alpha_divergence_coef=0.5, label_smoothing=NEEDS_LS.get(t, 0.0)),
            n=3, ref_noise=1.5)
    add("sigmoid_alpha1_is_reverse_kl", config(loss_type=["sigmoid"], beta=0.2,
        f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), n=3)
    add("sigmoid_alpha2", config(loss_type=["sigmoid"], beta=0.2, f_divergence_type="alpha_divergence",
                                 f_alpha_divergence_coef=2.0), n=3, ref_noise=1.0)
    # alpha 3: t = 2·logratio. Pair 0: rejected past the clamp at 80, chosen not; pair 1:
    # rejected at t = 75 (just inside); pair 2: both clamped (equal scores); pair 3: small.
    # hinge keeps the huge scores finite in float32 and their value visible in the loss.
    add("hinge_alpha3_clamped", config(loss_type=["hinge"], beta=0.2, f_divergence_type="alpha_divergence",
                                       f_alpha_divergence_coef=3.0), n=4, scale=0.3,
        log_ratios=[20.0, 5.0, 45.0, -3.0, 41.0, 37.5, 44.0, -2.5])
    add("sigmoid_alpha3_mixed", config(loss_type=["sigmoid"], beta=0.2, f_divergence_type="alpha_divergence",
                                       f_alpha_divergence_coef=3.0), n=4, ref_noise=60.0)
    # Combinations, weighted and not.
    add("mpo_sigmoid_bco_sft", config(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), n=4)
    add("sigmoid_plus_sft", config(loss_type=["sigmoid", "sft"]), n=3)
    add("ipo_hinge_forward_kl", config(loss_type=["ipo", "hinge"], loss_weights=[0.5, 2.0],
                                       f_divergence_type="forward_kl"), n=4, ref_noise=1.0)
    add("all_types", config(loss_type=ALL_TYPES, loss_weights=[0.1 * (i + 1) for i in range(len(ALL_TYPES))],
                            label_smoothing=0.05), n=5)
    # WPO weighting (TRL multiplies each type's per-sequence loss by the detached weights).
    for t in ALL_TYPES:
        if t in ("aot", "aot_unpaired"):
            continue
        try:
            add(f"{t}_wpo", config(loss_type=[t], beta=0.5, use_weighting=True,
                                   label_smoothing=NEEDS_LS.get(t, 0.0)), n=3, scale=0.6)
        except RuntimeError as e:
            print(f"note: TRL cannot run {t} with use_weighting: {str(e).splitlines()[0]}", file=sys.stderr)
    # LD-DPO.
    for a in (0.0, 0.5, 1.0):
        add(f"sigmoid_ld{a}", config(loss_type=["sigmoid"], beta=0.3, ld_alpha=a), n=4)
    add("ld_sft_ipo", config(loss_type=["sft", "ipo"], beta=0.3, ld_alpha=0.25), n=4)
    add("ld_wpo_bco", config(loss_type=["bco_pair"], beta=0.3, ld_alpha=0.7, use_weighting=True), n=3, scale=0.6)
    add("ld_aot", config(loss_type=["aot"], beta=0.3, ld_alpha=0.4), n=5)
    return cases


def window_case(env: Env) -> dict:
    """Batches through the real `log`: a train window of 3, an eval window of 2, a train window
    of 1 (num_tokens keeps counting train tokens only)."""
    cfg = config(loss_type=["sigmoid"], beta=0.1)
    torch.set_default_dtype(torch.float32)
    tr = env.trainer(cfg)
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(7)
    steps = []
    try:
        for mode, nbatches in (("train", 3), ("eval", 2), ("train", 1)):
            tr.model.train(mode == "train")
            batches = []
            for i in range(nbatches):
                batch = make_batch(gen, 2 + i, torch.float64, 3.0, 4.0, None)
                loss = tr._compute_loss(StandInModel(batch), run_inputs(batch), False)
                chosen, rejected = per_sequence(batch, cfg)
                batches.append({"chosen": chosen, "rejected": rejected, "loss": f(loss)})
            before = len(tr.state.log_history)
            tr.log({})
            logged = tr.state.log_history[before:]
            assert len(logged) == 1
            items = [[k, f(v)] for k, v in logged[0].items() if k not in ("step", "epoch")]
            steps.append({"mode": mode, "batches": batches, "logged": items})
    finally:
        torch.set_default_dtype(torch.float32)
    return {"name": "window_train3_eval2_train1", "config": cfg, "windows": steps}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def validation_case(env: Env, name: str, cfg: dict) -> dict:
    """What TRL does with `cfg`: init a trainer, then one loss computation on a small batch."""
    cap = _Capture()
    trl_logger = logging.getLogger("trl")
    trl_logger.addHandler(cap)
    outcome = {"outcome": "ok"}
    try:
        torch.set_default_dtype(torch.float32)
        tr = env.trainer(cfg)
        tr.model.train()
        torch.set_default_dtype(torch.float64)
        gen = torch.Generator().manual_seed(3)
        batch = make_batch(gen, 2, torch.float64, 3.0, 4.0, cfg["ld_alpha"])
        loss = tr._compute_loss(StandInModel(batch), run_inputs(batch), False)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        else:
            outcome = {"outcome": "not_a_tensor", "loss": loss}
    except Exception as e:  # noqa: BLE001 - recording what TRL raises is the point
        outcome = {"outcome": "error", "type": type(e).__name__, "message": str(e).splitlines()[0]}
    finally:
        torch.set_default_dtype(torch.float32)
        trl_logger.removeHandler(cap)
    # TRL's logger puts the process rank in front of the message.
    warned = [m.removeprefix("[RANK 0] ") for m in cap.messages if "label_smoothing" in m or "loss" in m]
    if outcome["outcome"] == "ok" and warned:
        outcome = {"outcome": "warning", "message": warned[0]}
    return {"name": name, "config": cfg, "trl": outcome}


def validation_cases(env: Env) -> list[dict]:
    v = []
    add = lambda name, **kw: v.append(validation_case(env, name, config(**kw)))  # noqa: E731
    add("defaults")
    add("exo_pair_needs_label_smoothing", loss_type=["exo_pair"])
    add("exo_pair_label_smoothing_ok", loss_type=["exo_pair"], label_smoothing=1e-3)
    for t in ALL_TYPES:
        add(f"forward_kl_{t}", loss_type=[t], f_divergence_type="forward_kl",
            label_smoothing=NEEDS_LS.get(t, 0.0))
    add("js_divergence_mixed_types", loss_type=["sigmoid", "nca_pair"], f_divergence_type="js_divergence")
    add("alpha_divergence_sppo", loss_type=["sppo_hard"], f_divergence_type="alpha_divergence")
    for ls in (-0.1, 0.0, 0.49, 0.5, 0.7):
        add(f"robust_label_smoothing_{ls}", loss_type=["robust"], label_smoothing=ls)
    add("wpo_aot", loss_type=["aot"], use_weighting=True)
    add("wpo_aot_unpaired", loss_type=["sigmoid", "aot_unpaired"], use_weighting=True)
    for t in ("sigmoid", "hinge", "sft"):
        add(f"wpo_{t}", loss_type=[t], use_weighting=True)
    add("loss_weights_length", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    add("loss_weights_length_single", loss_type=["sigmoid"], loss_weights=[1.0, 2.0])
    add("unknown_loss_type", loss_type=["dpo"])
    add("unknown_f_divergence", f_divergence_type="kl")
    add("empty_loss_type", loss_type=[])
    return v


def build() -> dict:
    env = Env()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cases = compute_cases(env)
            windows = [window_case(env)]
            validation = validation_cases(env)
    finally:
        env.close()
    return {
        "about": "TRL DPOTrainer._compute_loss on per-token stand-ins; see tools/gen_dpo_loss_fixtures.py",
        "versions": {"trl": trl.__version__, "torch": torch.__version__.split("+")[0],
                     "transformers": transformers.__version__},
        "cases": cases,
        "windows": windows,
        "validation": validation,
    }


def dump(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="recompute and compare with the committed file")
    args = ap.parse_args()
    text = dump(build())
    if len(text.encode()) > MAX_BYTES:
        print(f"fixture is {len(text.encode())} bytes, over {MAX_BYTES}", file=sys.stderr)
        return 1
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} differs from a fresh run", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
