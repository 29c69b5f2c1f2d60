#!/usr/bin/env python3
"""Attention of a verify pass: the synchronous loop's form against the overlapped loop's.

Run 11: an overlapped Llama-3-8B step took 11.3 ms of device time against 7.4 ms for a
synchronous verify of the same rows. The two passes differ in their attention: the
synchronous one attends over exactly the live keys with mlx-lm's "causal" mask, the
overlapped one (DeviceKVCache) over a 256-row bucket with a boolean array mask built from
device positions (bool: MLX's CUDA attention converts it in every call; additive, 0 / -inf in
bfloat16, as an (M, capacity) array or copied for every head as MLX lays out its own converted
mask). Each way is checked against the exact keys (max |difference|) and timed: one layer's
`mx.fast.scaled_dot_product_attention`
(Llama-3-8B heads: 32 query, 8 KV, dim 128; bfloat16) for M query rows at a context, in a
chain of 32 dependent calls (a forward's layers), µs a call. At M = 1 also the two-row way
of speculative/one_row.py (the row twice, so that cuDNN's masked kernel takes it).
Usage: python -m scripts.bench_attention [--out DIR]
"""
import argparse
import json
import os

import mlx.core as mx

from mtp_splitk import plan
from mtp_splitk.bench.timing import median_call_us

HEADS, KV_HEADS, DIM, LAYERS, BUCKET = 32, 8, 128, 32, 256


def chain(q, k, v, mask, twice=False):
    """``twice``: each call as speculative/one_row.py makes a one-row pass, the row
    and the (doubled) mask's row twice, the first copy kept."""
    def run():
        x = q
        for _ in range(LAYERS):
            if twice:
                x = two_rows(x, k, v, mask)
            else:
                x = mx.fast.scaled_dot_product_attention(x, k, v, scale=DIM**-0.5, mask=mask)
        mx.eval(x)

    return run


def two_rows(q, k, v, doubled_mask):
    both = mx.concatenate([q, q], axis=2)
    return mx.fast.scaled_dot_product_attention(both, k, v, scale=DIM**-0.5, mask=doubled_mask)[:, :, :1]


def row(M, context):
    live = context + M
    capacity = -(-live // BUCKET) * BUCKET
    q = mx.random.normal((1, HEADS, M, DIM)).astype(mx.bfloat16)
    k = mx.random.normal((1, KV_HEADS, capacity, DIM)).astype(mx.bfloat16)
    v = mx.random.normal((1, KV_HEADS, capacity, DIM)).astype(mx.bfloat16)
    mx.eval(q, k, v)
    offset = mx.array(context, mx.int32)
    array_mask = mx.arange(capacity)[None] <= (offset + mx.arange(M))[:, None]
    additive = mx.where(array_mask, mx.array(0, mx.bfloat16), mx.array(-mx.inf, mx.bfloat16))
    # The same numbers laid out as MLX lays out its own converted bool mask: every head's copy.
    per_head = mx.contiguous(mx.broadcast_to(additive, (1, HEADS, M, capacity)))
    mx.eval(array_mask, additive, per_head)
    causal = "causal" if M > 1 else None
    exact = mx.fast.scaled_dot_product_attention(q, k[:, :, :live], v[:, :, :live], scale=DIM**-0.5, mask=causal)
    masks = {"array_mask": array_mask, "additive_mask": additive, "additive_per_head": per_head}
    out = {"M": M, "context": context, "capacity": capacity,
           "causal_exact_us": median_call_us(chain(q, k[:, :, :live], v[:, :, :live], causal), per=LAYERS)}
    for name, mask in masks.items():
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=DIM**-0.5, mask=mask)
        # Against the exact keys: the same attention, so rounding apart (bf16) the same numbers.
        out[f"{name}_max_error"] = mx.abs(y - exact).max().item()
        out[f"{name}_bucket_us"] = median_call_us(chain(q, k, v, mask), per=LAYERS)
    if M == 1:  # one_row.py's way past MLX's missing one-query masked kernel
        doubled = mx.concatenate([additive, additive], axis=-2)
        out["two_rows_max_error"] = mx.abs(two_rows(q, k, v, doubled) - exact).max().item()
        out["two_rows_bucket_us"] = median_call_us(chain(q, k, v, doubled, twice=True), per=LAYERS)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for bench_attention.json")
    args = parser.parse_args()
    rows = [row(M, context) for context in (64, 300, 1000) for M in (1, 2, 5, 8)]
    names = ("array_mask", "additive_mask", "additive_per_head")
    print(f"{'M':>3} {'context':>8} {'causal, exact':>14} "
          + " ".join(f"{n + ' µs (error)':>28}" for n in names + ("two_rows",)))
    for r in rows:
        cells = " ".join(f"{r[n + '_bucket_us']:>18.1f} ({r[n + '_max_error']:7.4f})" for n in names
                         + (("two_rows",) if "two_rows_bucket_us" in r else ()))
        print(f"{r['M']:>3} {r['context']:>8} {r['causal_exact_us']:>14.1f} {cells}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"device": plan.current_device().name, "mlx": mx.__version__}
        with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
