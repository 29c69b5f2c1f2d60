# Copyright © 2026 mtp_splitk contributors

"""The benchmarks' reports: the markdown written beside each results JSON
(:func:`e2e_markdown`, :func:`tp_markdown`) and the plots (:func:`plot`;
needs matplotlib, which nothing else does)."""

import json
import os
from typing import Dict


def _host_probe_text(probes) -> str:
    """The host's speed at the start and end of the run (harness.host_probe)."""
    if not probes:
        return ""
    said = " → ".join(f"{p['build_us_per_op']:.2f} / {p['eval_us_per_op']:.2f}" for p in probes)
    return f" Host probe (µs an op of a chain of tiny adds, built / evaluated; start → end): {said}."


def e2e_markdown(doc: Dict) -> str:
    """bench_e2e.md: per model, plain decode, the speculative runs, verify latency, breakdown."""
    meta = doc["meta"]
    lines = [
        f"# End-to-end decoding — {meta['device']} ({meta['backend']}), MLX {meta['mlx']}, "
        f"mlx-lm {meta['mlx_lm']}",
        "",
        f"Command: `{meta['command']}` ({meta['date']}). Tokens/s of generation (prompt "
        f"excluded), median over {meta.get('repeats', '?')} runs of "
        f"{meta.get('max_tokens', '?')} tokens." + _host_probe_text(meta.get("host_probe")),
    ]
    for name, m in doc["models"].items():
        lines += ["", f"## {name}", ""]
        plain = m.get("plain", {})
        base = plain.get("mlx", {}).get("tps")
        if plain:
            lines += [
                "| plain decode | tok/s | each repeat | prompt tok/s | × MLX plain | tokens = mlx-lm loop's |",
                "|---|---|---|---|---|---|",
            ]
            for label, r in plain.items():
                ratio = r["tps"] / base if base else float("nan")
                each = " / ".join(f"{t:.0f}" for t in r.get("tps_all", []))  # the spread behind a median
                same = {True: "yes", False: "no"}.get(r.get("matches_plain"), "")  # compiled rows only
                lines.append(
                    f"| {label} | {r['tps']:.1f} | {each} | {r['prompt_tps']:.0f} | {ratio:.2f} | {same} |"
                )
        for section, title in (
            ("acceptance", "acceptance-controlled drafter"),
            ("draft", "draft model"),
            ("mtp", "MTP head"),
        ):
            rows = m.get(section, {})
            if not rows:
                continue
            lines += [
                "",
                f"**Speculative, {title}**",
                "",
                "| run | tok/s | × MLX plain | × same loop unpatched | acceptance (per token) "
                "| tokens/step | ms/step | verify ms | host a step: build / submit / wait ms "
                "| chain of 32 steps: build / evaluation ms a step "
                "| split-K matmuls of one forward | as recorded |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for key, r in rows.items():
                twin = (
                    rows.get(key.replace("patched", "mlx", 1))
                    if key.startswith("patched")
                    else None
                )
                vs_loop = f"{r['tps'] / twin['tps']:.2f}" if twin and twin["tps"] else ""
                vs_plain = f"{r['tps'] / base:.2f}" if base else ""
                census = r.get("matmuls")
                share = (
                    f"{census['splitk']}/{census['splitk'] + census['mlx']}"
                    if census and census["splitk"] + census["mlx"]
                    else ""
                )
                # Did the loop emit the tokens the drafter proposes from (so the
                # acceptance is the one asked for)? Only the acceptance runs say.
                recorded = {True: "yes", False: "no"}.get(r.get("matches_reference"), "")
                # The overlapped loop never waits for a verdict, so it has no verify time.
                verify_ms = "overlapped" if r.get("overlapped") else f"{r['verify_ms']:.2f}"
                if r.get("overlap_off"):  # asked for the overlapped loop, ran the synchronous one
                    verify_ms += " (synchronous: overlap off)"
                if key.endswith(" compiled") and not r.get("compiled_steps"):
                    verify_ms += " (no step compiled: caches it cannot trace)"
                split = (
                    f"{r['host_build_ms']:.2f} / {r['chain_eval_ms']:.2f}" if "chain_eval_ms" in r else ""
                )
                host = (
                    f"{r['build_ms']:.2f} / {r['submit_ms']:.2f} / {r['wait_ms']:.2f}" if "wait_ms" in r else ""
                )
                lines.append(
                    f"| {key} | {r['tps']:.1f} | {vs_plain} | {vs_loop} "
                    f"| {r['acceptance_rate']:.2f} ({r['per_token_acceptance']:.2f}) "
                    f"| {r['tokens_per_step']:.2f} | {r.get('step_ms', 0):.2f} | {verify_ms} "
                    f"| {host} | {split} | {share} | {recorded} |"
                )
        verify = m.get("verify_ms", {})
        if verify:
            Ms = sorted({int(M) for v in verify.values() for M in v})
            lines += [
                "",
                "**Verify step (one synchronous forward), ms**",
                "",
                "| M | " + " | ".join(verify) + " |",
                "|---" * (len(verify) + 1) + "|",
            ]
            for M in Ms:
                lines.append(
                    f"| {M} | "
                    + " | ".join(f"{v.get(str(M), float('nan')):.2f}" for v in verify.values())
                    + " |"
                )
        parts = m.get("breakdown", {})
        if parts:
            names = list(next(iter(parts.values())))
            lines += [
                "",
                "**Per-forward breakdown, ms (each part timed alone, × layers)**",
                "",
                "| run | " + " | ".join(names) + " |",
                "|---" * (len(names) + 1) + "|",
            ]
            for key, r in parts.items():
                lines.append(f"| {key} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def tp_markdown(doc: Dict) -> str:
    """bench_tp.md: per model, verify latency, greedy agreement, the planner's choices."""
    meta = doc["meta"]
    lines = [
        f"# Tensor parallelism — {meta['ranks']} x {meta['device']} ({meta['backend']}, "
        f"{meta['distributed']}), MLX {meta['mlx']}, mlx-lm {meta['mlx_lm']}",
        "",
        f"Command: `{meta['command']}` ({meta['date']}). Verify step: one synchronous forward "
        f"of M rows after a 64-token context, median of {meta['repeats']}, rank 0's clock.",
    ]
    if meta.get("smoke"):
        lines += [
            "",
            "**Smoke run (CPU, tiny model): checks the harness; the times mean nothing.**",
        ]
    for name, m in doc["models"].items():
        lines += ["", f"## {name}", ""]
        verify_ms = m.get("verify_ms", {})
        columns = [(where, label) for where, v in verify_ms.items() for label in v]
        if columns:
            lines += [
                "**Verify step, ms**",
                "",
                "| M | " + " | ".join(f"{w}, {label}" for w, label in columns) + " |",
                "|---" * (len(columns) + 1) + "|",
            ]
            Ms = sorted({int(M) for v in verify_ms.values() for r in v.values() for M in r})
            for M in Ms:
                cells = [verify_ms[w][label].get(str(M)) for w, label in columns]
                lines.append(
                    f"| {M} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |"
                )
        for where, rows in m.get("agreement", {}).items():
            lines += [
                "",
                f"**Greedy tokens, {where} vs one device**",
                "",
                "| run | equal | first difference |",
                "|---|---|---|",
            ]
            for run, r in rows.items():
                first = "" if r["first_difference"] is None else str(r["first_difference"])
                lines.append(f"| {run} | {'yes' if r['equal'] else 'no'} | {first} |")
        for where, rows in m.get("plans", {}).items():
            keys = [c for c in next(iter(rows.values()), {}) if c != "full"]
            lines += [
                "",
                f"**Planner, {where}: per-device shape vs full shape** (`-`: MLX's op; "
                "`wN`: split-K, N warps along K)",
                "",
                "| layer, per-device N x K | full | " + " | ".join(keys) + " |",
                "|---" * (len(keys) + 2) + "|",
            ]
            for key, r in rows.items():
                lines.append(f"| {key} | {r['full']} | " + " | ".join(r[c] for c in keys) + " |")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------


def _pyplot():
    # Imported here: matplotlib is needed for plots only, not a dependency of the package.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(path) -> str:
    """Plot a benchmark's JSON (bench_kernels.json, bench_moe.json or
    bench_e2e.json) next to it, same name with .png; returns that path."""
    plt = _pyplot()
    data = json.load(open(path))
    kind = os.path.basename(path)
    if kind == "bench_moe.json":
        return _plot_moe(plt, path, data)
    if kind == "bench_e2e.json":
        return _plot_e2e(plt, path, data)
    return _plot_kernels(plt, path, data)


def _save(fig, path) -> str:
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


def _plot_kernels(plt, path, data) -> str:
    rows, meta = data["rows"], data["meta"]
    groups = {}
    for r in rows:
        groups.setdefault(
            (f"{r['mode']}{r['bits']} g{r['group_size']}", r["N"], r["K"]), []
        ).append(r)
    n = len(groups)
    cols = 3
    fig, axes = plt.subplots(
        -(-n // cols), cols, figsize=(5 * cols, 3.6 * -(-n // cols)), squeeze=False
    )
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
    fig.suptitle(
        f"{meta['device']}, MLX {meta['mlx']}: copy {meta['copy_gbps']:.0f} GB/s, "
        f"trivial op {meta['trivial_op_us']:.1f} µs",
        fontsize=10,
    )
    return _save(fig, path)


def _plot_moe(plt, path, data) -> str:
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
    fig.suptitle(
        f"{meta['device']}, MLX {meta['mlx']}: copy {meta['copy_gbps']:.0f} GB/s, "
        f"trivial op {meta['trivial_op_us']:.1f} µs",
        fontsize=10,
    )
    return _save(fig, path)


def _plot_e2e(plt, path, data) -> str:
    models = data["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7.5), squeeze=False)
    for col, (name, m) in enumerate(models.items()):
        ax = axes[0][col]
        runs = m.get("acceptance", {})
        for label, style in (("mlx", "--"), ("patched", "-")):
            by_p = {}
            for key, r in runs.items():
                state, p, k, *loop = key.split()  # "patched p=0.8 k=4 overlap"
                if state == label:
                    by_p.setdefault((p, *loop), []).append((int(k[2:]), r["tps"]))
            for i, (series, pts) in enumerate(sorted(by_p.items())):
                pts.sort()
                ax.plot(
                    [k for k, _ in pts],
                    [t for _, t in pts],
                    style,
                    marker="o",
                    color=f"C{i}",
                    label=f"{'patched' if label == 'patched' else 'unpatched'} {' '.join(series)}",
                )
        for label, color in (("mlx", "gray"), ("patched", "black")):
            if label in m.get("plain", {}):
                ax.axhline(
                    m["plain"][label]["tps"],
                    color=color,
                    lw=0.8,
                    ls=":" if label == "mlx" else "-.",
                    label=f"plain decode, {label}",
                )
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
    return _save(fig, path)
