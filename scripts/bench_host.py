#!/usr/bin/env python3
"""Host (Python + graph-building) cost of one patched quantized matmul call.

A model forward makes a few hundred quantized matmul calls per token; in
mlx-lm's pipelined decode the host builds the next step's graph while the GPU
runs this one, so host µs per call add up to ms per token when the host is
the bottleneck. This measures, on any machine (the CPU build too), the cost
of one `QuantizedLinear` call unpatched and patched, with the planner told it
is on a CUDA device (the given tuning table) and the kernel launch replaced
by a stub that builds one MLX op (the real launch, `mx.fast.cuda_kernel`,
measured 5.2 µs of host time on the H200). Nothing is evaluated.

Usage: python scripts/bench_host.py [--device-name "NVIDIA H200"] [--calls 20000]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mtp_splitk import launch, patch, plan  # noqa: E402


def per_call_us(fn, calls, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def layer(N, K):
    q = nn.QuantizedLinear(K, N, bias=False)
    q.update({k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in q.parameters().items()})
    mx.eval(q.parameters())
    return q


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device-name", default="NVIDIA H200", help="whose tuning table the planner reads")
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    device = plan.Device("cuda", args.device_name, 132)
    plan.current_device = lambda: device  # the planner believes it is on that GPU
    assert plan.load_tuning(device.name), f"no tuning table for {device.name}"
    launches = []

    def stub(p, x, w, scales, biases, poison=None):
        launches.append(1)
        return mx.zeros((x.shape[0], p.N), x.dtype)  # one MLX op, like the real launch

    launch.dense = stub
    print(f"host µs per QuantizedLinear call (median of 5 x {args.calls}), planner on {device.name}'s table")
    print("| layer (N×K) | M | unpatched | patched | patched path |")
    print("|---|---|---|---|---|")
    for N, K, M in [(4096, 4096, 1), (4096, 4096, 2), (1024, 4096, 2), (128256, 4096, 1)]:
        q = layer(N, K)
        x = mx.zeros((1, M, K), mx.bfloat16)
        base = per_call_us(lambda: q(x), args.calls)
        launches.clear()
        with patch.enabled():
            patched = per_call_us(lambda: q(x), args.calls)
        path = "split-K (stub launch)" if launches else "MLX's op"
        print(f"| {N}×{K} | {M} | {base:.1f} | {patched:.1f} | {path} |")


if __name__ == "__main__":
    main()
