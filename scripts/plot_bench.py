#!/usr/bin/env python3
"""Plot a benchmark's JSON next to it (same name, .png):

- bench_kernels.json: time vs M per shape, ours vs MLX vs the floor (max of
  weight bytes / copy bandwidth and the trivial-op time, both measured in the
  same run);
- bench_moe.json: time vs tokens per MoE shape, ours vs mx.gather_qmm vs the
  unique-expert-bytes floor;
- bench_e2e.json: tokens/s vs k per acceptance (patched, unpatched, MLX plain
  decode), and verify-step latency vs M.
Usage: python scripts/plot_bench.py PATH.json
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path):
    data = json.load(open(path))
    kind = os.path.basename(path)
    if kind == "bench_moe.json":
        return plot_moe(path, data)
    if kind == "bench_e2e.json":
        return plot_e2e(path, data)
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


def save(fig, path):
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


def plot_moe(path, data):
    rows, meta = data["rows"], data["meta"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        rs = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["M"])
        ms = [r["M"] for r in rs]
        ax.plot(ms, [r["us_mlx"] for r in rs], "o-", label="mx.gather_qmm")
        ax.plot(ms, [r["us_ours"] for r in rs], "s-", label="mtp_splitk")
        ax.plot(ms, [r["floor_us"] for r in rs], "k--", label="floor (unique experts)")
        ax.set_title(f"{shape} (E={rs[0]['E']}, top-{rs[0]['top_k']})")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("µs per op")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, MLX {meta['mlx']}: copy {meta['copy_gbps']:.0f} GB/s, "
                 f"trivial op {meta['trivial_op_us']:.1f} µs", fontsize=10)
    save(fig, path)


def plot_e2e(path, data):
    models = data["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7.5), squeeze=False)
    for col, (name, m) in enumerate(models.items()):
        ax = axes[0][col]
        runs = m.get("acceptance", {})
        for label, style in (("mlx", "--"), ("patched", "-")):
            by_p = {}
            for key, r in runs.items():
                state, p, k, *every = key.split()  # "patched p=0.8 k=4 [every=4]"
                if state == label:
                    by_p.setdefault((p, *every), []).append((int(k[2:]), r["tps"]))
            for i, (series, pts) in enumerate(sorted(by_p.items())):
                pts.sort()
                ax.plot([k for k, _ in pts], [t for _, t in pts], style, marker="o", color=f"C{i}",
                        label=f"{'patched' if label == 'patched' else 'unpatched'} {' '.join(series)}")
        for label, color in (("mlx", "gray"), ("patched", "black")):
            if label in m.get("plain", {}):
                ax.axhline(m["plain"][label]["tps"], color=color, lw=0.8,
                           ls=":" if label == "mlx" else "-.", label=f"plain decode, {label}")
        ax.set_title(f"{name}: acceptance-controlled drafter")
        ax.set_xlabel("k (draft tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for label, times in m.get("verify_ms", {}).items():
            ms = sorted(int(M) for M in times)
            ax.plot(ms, [times[str(M)] for M in ms], "o-", label=label)
        ax.set_title(f"{name}: one verify forward")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if m.get("verify_ms"):
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
    meta = data["meta"]
    fig.suptitle(f"{meta['device']}, MLX {meta['mlx']}, mlx-lm {meta['mlx_lm']}", fontsize=10)
    save(fig, path)


if __name__ == "__main__":
    main(sys.argv[1])
