#!/usr/bin/env python3
"""Split-K kernel vs mx.quantized_matmul on the GPU, and the tuning table.

Method (see README, "Benchmarks"):
  * one op's time = wall time of building and evaluating a batch of R
    independent ops / R, median over repeats after warm-up: this includes
    MLX's per-op cost the way a model's forward pays it; beside it, the time
    a call in a chain of dependent calls (how a forward runs them), by which
    --tune sweeps the split and judges M = 1 (mtp_splitk.bench.tune);
  * the weights rotate through >= 3 x 50 MB (the H100's L2) of distinct
    copies, so every op streams its weights from HBM; x stays one array,
    as a layer's input is L2-resident in a real forward;
  * the copy bandwidth (a large elementwise copy, read + write bytes) and
    the trivial-op floor (an add on 16 elements) are measured in the same
    run, and every ratio is ours / MLX in the same run.

Writes <out>/bench_kernels.json, <out>/bench_kernels.md and, with --tune,
<out>/<device>.json (the planner's tuning table: split per shape, M cut-over).
Usage:
  python -m scripts.bench_kernels --out benchmarks [--tune] [--quick]
"""
import argparse
import json
import os
import sys

import mlx.core as mx

from mtp_splitk import launch, plan as planner
from mtp_splitk.bench import tune
from mtp_splitk.bench.kernels import chain_us, dense_plan, time_dense, tuning_table, weight_sets
from mtp_splitk.bench.timing import copy_bandwidth, trivial_op_floor

# Llama-3-8B's (q/o, k/v, gate/up, down, LM head), Qwen3-30B-A3B's attention (q, k/v, o) and LM
# head, and two small ones.
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (2560, 2560), (2048, 768), (151936, 2048),
          (128256, 4096), (4096, 2048), (512, 2048), (2048, 4096)]
MS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64]
# Shapes one fused launch takes (q/k/v; Llama's 4096x4096 is o's too): shape -> calls a layer.
FUSED_GROUPS = [{"4096x4096": 2, "1024x4096": 2}, {"4096x2048": 1, "512x2048": 2}]
# (mode, bits, group size, shapes): 4-bit g64 everywhere, the others on two shapes.
CONFIGS = [("affine", 4, 64, SHAPES)] + [
    (m, b, g, [SHAPES[0], SHAPES[2]]) for m, b, g in (("affine", 3, 64), ("affine", 8, 64), ("mxfp4", 4, 32))
]


def host_us(which, calls=2000):
    """Host µs to build (not evaluate) one call: MLX's side of the per-op cost."""
    import time

    N = K = 4096
    w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(mx.bfloat16), 64, 4)
    x = mx.random.normal((4, K)).astype(mx.bfloat16)
    mx.eval(w, scales, biases, x)
    p = planner.Plan("cuda", "affine", 4, 64, N, K, 4, 1)
    build = (lambda: launch.dense(p, x, w, scales, biases)) if which == "ours" else (
        lambda: mx.quantized_matmul(x, w, scales, biases, True, 64, 4))
    mx.eval(build())
    t0 = time.perf_counter()
    for _ in range(calls):
        build()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--tune", action="store_true", help="sweep the split and write the tuning table")
    ap.add_argument("--quick", action="store_true", help="4-bit g64 only (all shapes)")
    ap.add_argument("--configs", help="comma-separated indices into CONFIGS (0: 4-bit g64, 1: 3-bit, 2: 8-bit, 3: mxfp4)")
    ap.add_argument("--ms", default=None, help="comma-separated M values (default: all of MS)")
    ap.add_argument("--splits-from", metavar="TABLE", help="take split, depth and row tiles per shape from this "
                    "tuning table (e.g. another GPU's) instead of sweeping them; M ranges are still measured")
    ap.add_argument("--retune", metavar="DIR", help="rebuild the tuning table from DIR/bench_kernels.json and "
                    "DIR/<device>.json (the sweep's choices) without a GPU")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.retune:
        return retune(args.retune, args.out)
    assert mx.cuda.is_available(), "needs MLX's CUDA backend"
    device = planner.current_device()

    bw = copy_bandwidth()
    floor = trivial_op_floor()
    print(f"device {device.name}, {device.sm_count} SMs; copy {bw / 1e9:.0f} GB/s; trivial op {floor * 1e6:.1f} us",
          flush=True)

    configs = CONFIGS[:1] if args.quick else CONFIGS
    if args.configs:
        configs = [CONFIGS[int(i)] for i in args.configs.split(",")]
    rows, warps_k, depths, row_tiles = [], {}, {}, {}
    if args.splits_from:
        given = json.load(open(args.splits_from))
        warps_k, depths, row_tiles = dict(given["warps_k"]), dict(given["depth"]), dict(given["row_tiles"])
    print(f"graph-building host time per call: ours {host_us('ours'):.1f} us, "
          f"mx.quantized_matmul {host_us('mlx'):.1f} us", flush=True)
    if args.tune:
        sweep(configs[0], device, warps_k, depths, row_tiles)
    for mode, bits, group_size, shapes in configs:
        for N, K in shapes:
            sets, nbytes = weight_sets(N, K, mode, bits, group_size)
            key = f"{N}x{K}"
            wk = warps_k.get(key) or planner.choose_warps_k(N, K, device.sm_count)
            depth, rt = depths.get(key, 1), row_tiles.get(key, 1)
            for M in [int(m) for m in args.ms.split(",")] if args.ms else MS:
                x = mx.random.normal((M, K)).astype(mx.bfloat16)
                plan = dense_plan("cuda", mode, bits, group_size, N, K, M, wk, depth, rt)
                t_mlx, t_ours = (time_dense(sets, x, mode, bits, group_size, p) for p in (None, plan))
                c_mlx, c_ours = (chain_us(p, x, sets, mode, bits, group_size) for p in (None, plan))
                row = dict(mode=mode, bits=bits, group_size=group_size, N=N, K=K, M=M, warps_k=wk, depth=depth,
                           weight_bytes=nbytes, us_ours=t_ours * 1e6, us_mlx=t_mlx * 1e6,
                           chain_us_ours=c_ours, chain_us_mlx=c_mlx,
                           speedup=tune.judged_speedup(M, t_mlx / t_ours, c_mlx / c_ours),
                           gbps_ours=nbytes / t_ours / 1e9,
                           pct_copy_bw=100 * nbytes / t_ours / bw,
                           floor_us=max(nbytes / bw, floor) * 1e6)
                rows.append(row)
                print(f"{mode}{bits} g{group_size} {N}x{K} M={M:2d} wk={wk:2d} d={depth}: ours {row['us_ours']:7.1f} us  "
                      f"mlx {row['us_mlx']:7.1f} us; chain ours {c_ours:7.1f} mlx {c_mlx:7.1f}  x{row['speedup']:.2f}  "
                      f"{row['pct_copy_bw']:.0f}% bw", flush=True)
            del sets

    meta = dict(device=device.name, sm_count=device.sm_count, mlx=mx.__version__, copy_gbps=bw / 1e9,
                trivial_op_us=floor * 1e6, command=" ".join(sys.argv))
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    write_markdown(os.path.join(args.out, "bench_kernels.md"), meta, rows)
    if args.tune:
        table = tuning_table(rows, warps_k, depths, row_tiles, meta)
        path = os.path.join(args.out, planner.tuning_key(device.name) + ".json")
        with open(path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        print("tuning table:", json.dumps(table["m_range"]))


def sweep(config, device, warps_k, depths, row_tiles):
    """Each shape's split (the shape alone decides it: batch invariance) swept in
    dependent chains, then one split for the shapes of a fused launch where
    sharing it costs little (tune.shared_splits); into the three dicts."""
    mode, bits, group_size, shapes = config
    scores = {}
    for N, K in shapes:
        key = f"{N}x{K}"
        if key not in warps_k:
            scores[key] = tune.sweep_scores(tune.Variant("dense", mode, bits, group_size, N, K), device,
                                            log=lambda line: print(line, flush=True))
            warps_k[key], depths[key], row_tiles[key] = min(scores[key], key=scores[key].get)
    for calls in FUSED_GROUPS:
        if all(shape in scores for shape in calls):
            shared = tune.shared_splits(scores, calls)
            print(f"  one split for {', '.join(calls)}: {shared or 'none (one costs over 10% more than apart)'}",
                  flush=True)
            for shape, split in (shared or {}).items():
                warps_k[shape], depths[shape], row_tiles[shape] = split


def retune(src, out):
    data = json.load(open(os.path.join(src, "bench_kernels.json")))
    key = planner.tuning_key(data["meta"]["device"])
    old = json.load(open(os.path.join(src, key + ".json")))
    table = tuning_table(data["rows"], old["warps_k"], old["depth"], old["row_tiles"], data["meta"])
    if "moe_p_range" in old:  # merged in by scripts/install_tuning.py; not this script's to drop
        table["moe_p_range"] = old["moe_p_range"]
    with open(os.path.join(out, key + ".json"), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    print(json.dumps(table["m_range"]))


def write_markdown(path, meta, rows):
    lines = [
        f"# Split-K kernel vs mx.quantized_matmul — {meta['device']}, MLX {meta['mlx']}",
        "",
        f"Copy bandwidth {meta['copy_gbps']:.0f} GB/s, trivial-op floor {meta['trivial_op_us']:.1f} us "
        f"(both measured in this run). Command: `{meta['command']}`",
        "",
        "| mode | N×K | M | split | ours µs | MLX µs | MLX/ours | ours GB/s | % copy bw | floor µs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']}{r['bits']} g{r['group_size']} | {r['N']}×{r['K']} | {r['M']} | {r['warps_k']} | "
            f"{r['us_ours']:.1f} | {r['us_mlx']:.1f} | {r['speedup']:.2f} | {r['gbps_ours']:.0f} | "
            f"{r['pct_copy_bw']:.0f} | {r['floor_us']:.1f} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
