#!/usr/bin/env python3
"""Tensor-parallel verify latency and greedy agreement, sharded vs one device.

The same as `mtp-splitk bench tp`; see mtp_splitk/bench/tp.py for the
method. Examples:
    # 2 GPUs, NCCL (one host; the ranks share --model-dir):
    mlx.launch --backend nccl -n 2 -- python -m scripts.bench_tp --out benchmarks/tp
    # CPU smoke: starts 2 ring ranks on 127.0.0.1 itself; a tiny float32 MoE
    python -m scripts.bench_tp --smoke --out /tmp/tp
"""
import sys

from mtp_splitk import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "tp", *sys.argv[1:]]))
