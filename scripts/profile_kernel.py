#!/usr/bin/env python3
"""Launch a few split-K variants and MLX's own op for Nsight Compute.

  ncu --clock-control none -k "regex:mtp_splitk|qmv|qmm" --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --csv --log-file ncu.csv \
      python -m scripts.profile_kernel
  python -m scripts.profile_kernel --summarize ncu.csv

With --moe: the grouped kernel on Qwen3-30B-A3B's experts (gate/up 768x2048, down
2048x768, 128 experts, top-8) at 8 and 40 pairs (decode, a k = 4 verify) over
(warps, depth, row tiles), and mx.gather_qmm on the same calls. Both modes take each
one-token-tile variant also with the lean K loop (Plan.lean).
"""
import csv
import sys

KEYS = ["Duration", "DRAM Throughput", "Memory Throughput", "Registers Per Thread", "Achieved Occupancy",
        "Theoretical Occupancy", "Warp Cycles Per Issued Instruction", "Grid Size", "Block Size",
        "Block Limit Registers", "Compute (SM) Throughput"]


def summarize(path):
    kernels = {}
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        k = kernels.setdefault(r["ID"], {"name": r["Kernel Name"][:60]})
        if r["Metric Name"] in KEYS:
            k[r["Metric Name"]] = f"{r['Metric Value']} {r['Metric Unit']}".strip()
    for i, k in kernels.items():
        print(i, k.pop("name"))
        print("    " + "; ".join(f"{key}={k[key]}" for key in KEYS if key in k))


def main_moe():
    import mlx.core as mx
    import numpy as np

    from mtp_splitk import plan as planner
    from mtp_splitk.bench.kernels import gather_call, packed_experts, prepared_calls, routings

    rng = np.random.default_rng(0)
    configs = []
    for name, N, K in (("gate/up", 768, 2048), ("down", 2048, 768)):
        (parts,), _ = packed_experts(128, N, K)
        for M in (1, 5):
            call = prepared_calls(mx.random.normal((M, K)).astype(mx.bfloat16), routings(M, 128, 8, 1, rng), 8)[0]
            mx.eval(gather_call(None, call, parts, 8))
            configs.append(f"mlx {name} {N}x{K} pairs={8 * M}")
            for wk, depth, rt, lean in ((1, 1, 1, False), (2, 1, 1, False), (2, 2, 1, False), (4, 1, 1, False),
                                        (2, 1, 2, False), (2, 2, 2, False), (4, 1, 2, False), (2, 2, 1, True),
                                        (4, 2, 1, True), (2, 2, 2, True)):
                if wk > -(-K // planner.K_PER_CHUNK):
                    continue
                plan = planner.Plan("cuda", "affine", 4, 64, N, K, wk, 1, depth, rt, lean)
                mx.eval(gather_call(plan, call, parts, 8))
                configs.append(f"ours {name} {N}x{K} pairs={8 * M} wk={wk} depth={depth} rt={rt} lean={lean}")
    print("\n".join(f"launch order {i}: {c}" for i, c in enumerate(configs)))


def main():
    import mlx.core as mx

    from mtp_splitk import launch, plan as planner

    configs = []
    for N, K in ((14336, 4096), (4096, 4096), (2048, 768)):
        w = (mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16)
        wq, s, b = mx.quantize(w, 64, 4)
        for M in (1, 8):
            x = mx.random.normal((M, K)).astype(mx.bfloat16)
            mx.eval(wq, s, b, x)
            mx.eval(mx.quantized_matmul(x, wq, s, b))
            configs.append(f"mlx {N}x{K} M={M}")
            tiles = planner.token_tiles_for(M)
            for wk, depth, rt, lean in ((2, 1, 1, False), (4, 2, 1, False), (4, 2, 2, False), (8, 2, 2, False),
                                        (4, 2, 1, True), (4, 3, 1, True)):
                if wk > -(-K // planner.K_PER_CHUNK) or (lean and tiles > 1):
                    continue  # more warps than K has chunks; the lean loop takes one token tile
                plan = planner.Plan("cuda", "affine", 4, 64, N, K, wk, tiles, depth, rt, lean)
                mx.eval(launch.dense(plan, x, wq, s, b))
                configs.append(f"ours {N}x{K} M={M} wk={wk} depth={depth} rt={rt} lean={lean}")
    print("\n".join(f"launch order {i}: {c}" for i, c in enumerate(configs)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    elif sys.argv[1:] == ["--moe"]:
        main_moe()
    else:
        main()
