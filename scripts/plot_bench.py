#!/usr/bin/env python3
"""Plot a benchmark's JSON next to it (same name, .png):

- bench_kernels.json: time vs M per shape, ours vs MLX vs the floor (max of
  weight bytes / copy bandwidth and the trivial-op time, both measured in the
  same run);
- bench_moe.json: time vs tokens per MoE shape, ours vs mx.gather_qmm vs the
  unique-expert-bytes floor;
- bench_e2e.json: tokens/s vs k per acceptance (patched, unpatched, MLX plain
  decode), and verify-step latency vs M.
The plots are mtp_splitk/bench/report.py's (they need matplotlib).
Usage: python -m scripts.plot_bench PATH.json
"""
import sys

from mtp_splitk.bench import report

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(report.plot(sys.argv[1]))
