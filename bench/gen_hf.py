#!/usr/bin/env python3
"""Baseline for `prefer sample`: HF transformers `generate`, batched, bf16, on the GPU.

Reads the same prompt file `prefer sample` reads (JSON Lines, `prompt_ids` + a per-row
`max_tokens`; see bench/gpu/gen.sh) and generates with do_sample=True, top_k, top_p and
temperature as given, ignoring EOS (min_new_tokens = max_new_tokens, so every row gets
exactly its length). Prints one JSON line.

Batching: rows are sorted by (output length, prompt length) and cut into batches of
--batch rows (length buckets: little padding, little overrun); each batch is left-padded
and generates the longest output of its rows. Only the tokens the rows asked for count
(a row that asked for 40 tokens in a batch that ran 60 counts 40).

Time cap: with --max-batches N only N batches, spread evenly over the sorted list, are
timed; the result then says `"extrapolated": true` and the total time is the measured
output tokens/s applied to all the rows' tokens. One small warm-up generate runs first.

    python3 bench/gen_hf.py MODEL_DIR --prompts P.jsonl [--batch 256] [--max-batches N]
        [--top-k 5 --top-p 0.8 --temperature 0.7] [--json-out F]
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def load_prompts(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            ids, out = r.get("prompt_ids"), r.get("max_tokens")
            if not ids or not isinstance(out, int) or out < 1:
                raise SystemExit(f"{path}:{n}: expected prompt_ids (non-empty) and max_tokens >= 1")
            rows.append((ids, out))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def batches_of(rows, size):
    order = sorted(range(len(rows)), key=lambda i: (rows[i][1], len(rows[i][0])))
    return [order[i:i + size] for i in range(0, len(order), size)]


def spread(n_total, n_pick):
    """n_pick indices spread evenly over range(n_total)."""
    if n_pick >= n_total:
        return list(range(n_total))
    return sorted({round(i * (n_total - 1) / max(n_pick - 1, 1)) for i in range(n_pick)})


def run_batch(model, rows, idx, args, pad_id):
    prompts = [rows[i][0] for i in idx]
    new = max(rows[i][1] for i in idx)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=args.top_k,
                             top_p=args.top_p, temperature=args.temperature, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=pad_id)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    assert out.shape[1] - width == new, (out.shape, width, new)
    return secs, sum(rows[i][1] for i in idx), len(idx) * new


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-batches", type=int, default=0, help="time only this many batches (0: all)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    load_s = time.perf_counter() - t_load
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rows = load_prompts(args.prompts)
    all_batches = batches_of(rows, args.batch)
    picked = spread(len(all_batches), args.max_batches) if args.max_batches > 0 else list(range(len(all_batches)))

    # Warm-up: kernels, allocator.
    run_batch(model, [(rows[0][0], 4), (rows[-1][0], 4)], [0, 1], args, pad_id)
    torch.cuda.reset_peak_memory_stats()

    secs = useful = computed = 0
    per_batch = []
    for k in picked:
        s, u, c = run_batch(model, rows, all_batches[k], args, pad_id)
        secs += s
        useful += u
        computed += c
        per_batch.append({"batch": k, "rows": len(all_batches[k]), "seconds": round(s, 3),
                          "tokens": u, "tokens_per_s": round(u / s, 1)})
        print(f"batch {k}: {len(all_batches[k])} rows, {u} tokens in {s:.2f} s ({u / s:.0f} tokens/s)",
              flush=True)
    total_tokens = sum(r[1] for r in rows)
    rate = useful / secs
    result = {
        "model": args.model,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "rows": len(rows),
        "batch": args.batch,
        "batches": len(all_batches),
        "timed_batches": len(picked),
        "extrapolated": len(picked) < len(all_batches),
        "timed_seconds": round(secs, 3),
        "timed_output_tokens": useful,
        "generated_tokens_incl_overrun": computed,
        "output_tokens": total_tokens,
        "output_tokens_per_s": round(rate, 1),
        "seconds": round(total_tokens / rate, 2),
        "load_seconds": round(load_s, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "per_batch": per_batch,
        "sampling": {"top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature},
    }
    line = json.dumps(result)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
