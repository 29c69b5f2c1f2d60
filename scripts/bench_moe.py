#!/usr/bin/env python3
"""Grouped split-K MoE kernel vs mx.gather_qmm on the GPU, as mlx-lm calls it.

Per MoE shape and token count M: top-k routing drawn like a router's (k
distinct experts per token, a fresh draw for every call of a timing batch,
so the experts touched change from call to call), 4-bit g64 experts made
directly in packed form (random codes and scales). Both sides get mlx-lm's
call: unsorted for M * top_k < 64, pre-sorted with sorted_indices=True
otherwise. Columns: µs per op (timing as in scripts/bench_kernels.py),
unique experts per call, % of the unique experts' bytes over the copy
bandwidth, and MLX / ours in the same run.

Writes <out>/bench_moe.json and <out>/bench_moe.md; with --tune each shape's
split and prefetch depth are swept first in dependent chains, and they and the
pair ranges where the kernel won (by plan.required_speedup: the chain's at
M = 1, the lower of independent and chain elsewhere) go into
<out>/<device>_moe.json, which scripts/install_tuning.py merges into the
planner's table.
Usage: python -m scripts.bench_moe --out benchmarks/moe [--tune] [--shapes 0,1] [--ms 1,2,4]
       python -m scripts.bench_moe --retune DIR
"""
import argparse
import json
import os
import sys

import mlx.core as mx
import numpy as np

from mtp_splitk import plan as planner
from mtp_splitk.bench import tune
from mtp_splitk.bench.kernels import (CALLS, gather_chain_us, moe_ranges, packed_experts, prepared_calls,
                                      routings, time_gather, time_gather_glu)
from mtp_splitk.bench.timing import copy_bandwidth, trivial_op_floor

# (name, E, N, K, top_k)
SHAPES = [
    ("qwen3-30b-a3b gate/up", 128, 768, 2048, 8),
    ("qwen3-30b-a3b down", 128, 2048, 768, 8),
    ("deepseek-v3 gate/up", 256, 2048, 7168, 8),
    ("deepseek-v3 down", 256, 7168, 2048, 8),
    ("gpt-oss-20b", 32, 2880, 2880, 4),
    # The hybrid Qwens' experts (mtp_splitk/synthetic/sizes.py says where each was read).
    ("qwen3-next-80b-a3b gate/up", 512, 512, 2048, 10),
    ("qwen3-next-80b-a3b down", 512, 2048, 512, 10),
    ("qwen3.5-122b-a10b gate/up", 256, 1024, 3072, 8),
    ("qwen3.5-122b-a10b down", 256, 3072, 1024, 8),
]
MS = [1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 32]
SPLIT_MS = (5, 16)  # a k = 4 verify and a wide one: what --tune judges a split at


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/moe")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--retune", metavar="DIR", help="rebuild DIR/<device>_moe.json from DIR/bench_moe.json "
                    "(no GPU needed)")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES")
    ap.add_argument("--ms", default=None, help="comma-separated token counts (default: all of MS)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.retune:
        data = json.load(open(os.path.join(args.retune, "bench_moe.json")))
        return write_ranges(data["rows"], data["meta"], args.retune)
    assert mx.cuda.is_available(), "needs MLX's CUDA backend"
    device = planner.current_device()
    bw, floor = copy_bandwidth(), trivial_op_floor()
    print(f"device {device.name}; copy {bw / 1e9:.0f} GB/s; trivial op {floor * 1e6:.1f} us", flush=True)
    rng = np.random.default_rng(0)
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    meta = dict(device=device.name, mlx=mx.__version__, copy_gbps=bw / 1e9, trivial_op_us=floor * 1e6,
                command=" ".join(sys.argv), swept=args.tune)  # swept: the rows' split and depth are the sweep's
    rows, splits = [], {}
    for name, E, N, K, top_k in shapes:
        expert_bytes = E * N * K // 2
        copies = max(1, min(3, int(3 * 50e6 // expert_bytes) + 1))
        sets, bytes_per_expert = packed_experts(E, N, K, copies=copies)
        shape = f"{E}x{N}x{K}"
        if args.tune:
            splits[shape] = sweep(name, E, N, K, top_k, sets, rng)
        warps, depth = splits.get(shape) or planner.moe_split(planner.load_tuning(device.name), E, N, K,
                                                              device.sm_count)
        for M in [int(m) for m in args.ms.split(",")] if args.ms else MS:
            x = mx.random.normal((M, K)).astype(mx.bfloat16)
            idxs = routings(M, E, top_k, CALLS, rng)
            calls = prepared_calls(x, idxs, top_k)
            unique = float(np.mean([len(np.unique(i)) for i in idxs]))
            P = M * top_k
            plan = planner.Plan("cuda", "affine", 4, 64, N, K, warps, 1, depth, lean=planner.lean("cuda", 1))
            t_mlx, t_ours = time_gather(sets, calls, top_k), time_gather(sets, calls, top_k, plan)
            c_mlx, c_ours = (gather_chain_us(p, x, idxs[0], sets, top_k) for p in (None, plan))
            min_time = unique * bytes_per_expert / bw
            row = dict(shape=name, E=E, N=N, K=K, top_k=top_k, M=M, pairs=P, unique_experts=unique,
                       warps_k=plan.warps_k, depth=depth, us_ours=t_ours * 1e6, us_mlx=t_mlx * 1e6,
                       chain_us_ours=c_ours, chain_us_mlx=c_mlx,
                       speedup=tune.judged_speedup(M, t_mlx / t_ours, c_mlx / c_ours),
                       pct_unique_bytes_bw=100 * min_time / t_ours,
                       floor_us=max(min_time, floor) * 1e6)
            if name.endswith("gate/up") and 2 * warps <= max(planner.WARP_CHOICES):
                # SwitchGLU's gate, up and swiglu: one fused launch against MLX's three ops.
                row["us_glu_mlx"], row["us_glu_ours"] = (
                    1e6 * time_gather_glu(sets, calls, top_k, p) for p in (None, plan))
            rows.append(row)
            print(f"{name:22s} M={M:2d} P={P:3d} uniq={unique:5.1f}: ours {row['us_ours']:7.1f} us  "
                  f"mlx {row['us_mlx']:7.1f} us; chain ours {c_ours:7.1f} mlx {c_mlx:7.1f}  x{row['speedup']:.2f}  "
                  f"{row['pct_unique_bytes_bw']:.0f}% floor {row['floor_us']:.1f}"
                  + (f"; gate/up+swiglu fused {row['us_glu_ours']:.1f} us, mlx {row['us_glu_mlx']:.1f}"
                     if "us_glu_ours" in row else ""), flush=True)
        del sets
        # After every shape: a run cut by its time box keeps what it measured.
        write_results(rows, meta, args.out, args.tune)


def write_results(rows, meta, out, tune_table):
    json.dump(dict(meta=meta, rows=rows), open(os.path.join(out, "bench_moe.json"), "w"), indent=1)
    lines = [f"# Grouped MoE kernel vs mx.gather_qmm — {meta['device']}, MLX {meta['mlx']}", "",
             f"Copy {meta['copy_gbps']:.0f} GB/s, trivial op {meta['trivial_op_us']:.1f} µs (this run). "
             f"Command: `{meta['command']}`", "",
             "| shape | E | N×K | top-k | M | pairs | unique experts | ours µs | MLX µs | MLX/ours "
             "| % unique-expert bytes / copy bw | floor µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['E']} | {r['N']}×{r['K']} | {r['top_k']} | {r['M']} | {r['pairs']} | "
                     f"{r['unique_experts']:.1f} | {r['us_ours']:.1f} | {r['us_mlx']:.1f} | {r['speedup']:.2f} | "
                     f"{r['pct_unique_bytes_bw']:.0f} | {r['floor_us']:.1f} |")
    glu = [r for r in rows if "us_glu_ours" in r]
    if glu:
        lines += ["", "SwitchGLU's gate, up and swiglu: one fused grouped launch against MLX's two gather_qmm "
                  "and mlx-lm's swiglu (µs, independent calls):", "",
                  "| shape | M | pairs | fused µs | MLX µs | MLX/fused |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['M']} | {r['pairs']} | {r['us_glu_ours']:.1f} | {r['us_glu_mlx']:.1f} | "
                  f"{r['us_glu_mlx'] / r['us_glu_ours']:.2f} |" for r in glu]
    open(os.path.join(out, "bench_moe.md"), "w").write("\n".join(lines) + "\n")
    if tune_table:
        write_ranges(rows, meta, out)


def sweep(name, E, N, K, top_k, sets, rng):
    """(warps along K, depth) of the grouped kernel for this expert shape: the
    lowest worst time over SPLIT_MS in dependent chains (the shape alone
    decides it: batch invariance)."""
    inputs = [(mx.random.normal((M, K)).astype(mx.bfloat16), routings(M, E, top_k, 1, rng)[0]) for M in SPLIT_MS]
    worst = {}
    for warps in (w for w in planner.WARP_CHOICES if w <= -(-K // planner.K_PER_CHUNK)):
        for depth in tune.SPLIT_DEPTHS:
            plan = planner.Plan("cuda", "affine", 4, 64, N, K, warps, 1, depth, lean=planner.lean("cuda", 1))
            worst[(warps, depth)] = max(gather_chain_us(plan, x, idx, sets, top_k) for x, idx in inputs)
    print(f"  {name}: split,depth (chain µs a call, worst of M = {SPLIT_MS}): "
          + ", ".join(f"{k}:{t:.1f}" for k, t in worst.items()), flush=True)
    return min(worst, key=worst.get)


def write_ranges(rows, meta, out):
    """<out>/<device>_moe.json: per expert shape, the pair counts where the
    kernel measured at least plan.required_speedup(M) times faster than MLX,
    the same for the fused gate/up launch against MLX's three ops, and, where
    the rows ran at the sweep's choices (``meta["swept"]``; records before run
    14 have no depth), each shape's (warps along K, depth)."""
    ranges = moe_ranges(rows)  # the rows are affine 4-bit
    table = dict(device=meta["device"], moe_p_range=ranges, measured_with=meta["command"],
                 min_speedup=planner.MIN_SPEEDUP, decode_min_speedup=planner.DECODE_MIN_SPEEDUP)
    if meta.get("swept"):
        table["moe_warps_k"] = {f"{r['E']}x{r['N']}x{r['K']}": r["warps_k"] for r in rows}
        table["moe_depth"] = {f"{r['E']}x{r['N']}x{r['K']}": r["depth"] for r in rows}
    glu = [dict(E=r["E"], N=r["N"], K=r["K"], pairs=r["pairs"], M=r["M"], speedup=r["us_glu_mlx"] / r["us_glu_ours"])
           for r in rows if "us_glu_ours" in r]  # independent calls only: M = 1 is not admitted
    if glu:  # where SwitchGLU's fused gate/up beat MLX's three ops (plan.plan_gather_glu)
        table["moe_glu_p_range"] = moe_ranges(glu)
    with open(os.path.join(out, planner.tuning_key(meta["device"]) + "_moe.json"), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    print("moe pair ranges:", ranges)


if __name__ == "__main__":
    main()
