#!/usr/bin/env python3
"""Quantized matmuls the way a model runs them: each op's input is the
previous op's output, ours against MLX's, on Llama-3-8B's MLP shapes.

scripts/bench_kernels.py times a batch of independent ops, so one op's host
work overlaps the previous op's GPU work and the ratio it reports is that of
max(host, GPU). In a decode step every matmul waits for the one before, and
at M = 1 the end-to-end run disagreed with it (benchmarks/h200/e2e_run5). This
times, per op, at M = 1, 2, 4, 8:
  chain   a chain of 64 dependent ops (up 14336x4096, down 4096x14336,
          alternating, 16 weight copies: past the L2), built and evaluated;
  build   building that chain's graph alone (host, nothing evaluated);
  single  one op built, evaluated and waited for (host + dispatch + GPU).
Usage: python -m scripts.bench_chain [--out DIR]
"""
import argparse
import json
import os
import sys

import mlx.core as mx

from mtp_splitk import launch, plan as planner
from mtp_splitk.bench.kernels import chain as dependent_chain
from mtp_splitk.bench.timing import median_call_us as median_us

UP, DOWN = (14336, 4096), (4096, 14336)
COPIES = 8  # pairs: 8 x 2 x 29 MB, past the 50 MB L2
LENGTH = 64


def quantized(N, K, seed):
    mx.random.seed(seed)
    parts = mx.quantize((mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16), 64, 4)
    mx.eval(parts)
    return parts


def op(kind, x, parts):
    w, s, b = parts
    if kind == "mlx":
        return mx.quantized_matmul(x, w, s, b, True, 64, 4)
    N = w.shape[0]
    K = x.shape[1]
    table = planner.load_tuning(planner.current_device().name)
    key = f"{N}x{K}"
    tiles = planner.token_tiles_for(x.shape[0])
    plan = planner.Plan("cuda", "affine", 4, 64, N, K, table.get("warps_k", {}).get(key, 2), tiles,
                        table.get("depth", {}).get(key, 1), 1, planner.lean("cuda", tiles))
    return launch.dense(plan, x, w, s, b)


def chain(kind, x, weights):
    return dependent_chain(lambda x, parts: op(kind, x, parts), x, weights, LENGTH)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not mx.cuda.is_available():
        sys.exit("bench_chain.py needs MLX's CUDA backend (the kernels do not run on this machine).")
    weights = []
    for i in range(COPIES):
        weights += [quantized(*UP, 2 * i), quantized(*DOWN, 2 * i + 1)]
    rows = []
    for M in (1, 2, 4, 8):
        x = mx.random.normal((M, UP[1])).astype(mx.bfloat16)
        mx.eval(x)
        row = {"M": M}
        for kind in ("mlx", "ours"):
            row[f"chain_{kind}"] = median_us(lambda: mx.eval(chain(kind, x, weights)), per=LENGTH)
            row[f"build_{kind}"] = median_us(lambda: chain(kind, x, weights), per=LENGTH)
            row[f"single_{kind}"] = median_us(lambda: mx.eval(op(kind, x, weights[0])), reps=50)
        rows.append(row)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_chain.json"), "w") as f:
            json.dump(dict(device=planner.current_device().name, mlx=mx.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
