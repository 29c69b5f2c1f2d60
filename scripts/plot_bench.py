#!/usr/bin/env python3
"""Plot benchmarks/kernels/bench_kernels.json: time vs M per shape, ours vs
MLX vs the floor (max of weight bytes / copy bandwidth and the trivial-op
time, both measured in the same run).
Usage: python scripts/plot_bench.py benchmarks/kernels/bench_kernels.json
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path):
    data = json.load(open(path))
    rows, meta = data["rows"], data["meta"]
    groups = {}
    for r in rows:
        groups.setdefault((f"{r['mode']}{r['bits']} g{r['group_size']}", r["N"], r["K"]), []).append(r)
    n = len(groups)
    cols = 3
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(5 * cols, 3.6 * -(-n // cols)), squeeze=False)
    for ax, ((mode, N, K), rs) in zip(axes.flat, groups.items()):
        rs = sorted(rs, key=lambda r: r["M"])
        ms = [r["M"] for r in rs]
        ax.plot(ms, [r["us_mlx"] for r in rs], "o-", label="mx.quantized_matmul")
        ax.plot(ms, [r["us_ours"] for r in rs], "s-", label="mtp_splitk")
        ax.plot(ms, [r["floor_us"] for r in rs], "k--", label="floor")
        ax.set_title(f"{mode} {N}x{K}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("µs per op")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, MLX {meta['mlx']}: copy {meta['copy_gbps']:.0f} GB/s, "
                 f"trivial op {meta['trivial_op_us']:.1f} µs", fontsize=10)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
