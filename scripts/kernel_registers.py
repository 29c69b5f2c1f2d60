#!/usr/bin/env python3
"""Registers and spills of the dense kernel's variants, from nvcc (no GPU needed).

The kernel text is what mtp_splitk.launch hands mx.fast.cuda_kernel, compiled for
sm_90 inside a wrapper like the one MLX generates, with ``-Xptxas -v``. MLX launches
without launch bounds, so a variant's registers decide how many of its blocks an SM
holds (65,536 registers an SM on Hopper) and so the loads in flight.

Usage: python -m scripts.kernel_registers [--arch sm_90]
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from mtp_splitk import launch
from mtp_splitk.plan import Plan

CONFIGS = [(wk, depth, rt, nt) for wk in (2, 8) for depth in (1, 2, 3) for rt in (1, 2) for nt in (1, 2)]
TYPES = ["__nv_bfloat16", "uint32_t", "__nv_bfloat16", "__nv_bfloat16"]


def kernel_texts(configs):
    """The (header, body, input names) mtp_splitk.launch builds for each config."""
    recorded = []

    def record(**kw):
        recorded.append(kw)
        return lambda **call: [mx.zeros(s, d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]

    real, mx.fast.cuda_kernel = mx.fast.cuda_kernel, record
    launch.cuda.dense_launch.cache_clear()
    try:
        wq, s, b = mx.quantize(mx.random.normal((40, 256)).astype(mx.bfloat16), 64, 4)
        x = mx.random.normal((5, 256)).astype(mx.bfloat16)
        for wk, depth, rt, nt in configs:
            launch.dense(Plan("cuda", "affine", 4, 64, 40, 256, wk, nt, depth, rt), x, wq, s, b)
    finally:
        mx.fast.cuda_kernel = real
        launch.cuda.dense_launch.cache_clear()
    return recorded


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    if shutil.which("nvcc") is None:
        sys.exit("kernel_registers.py needs nvcc on the PATH")
    kernels = kernel_texts(CONFIGS)
    src = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n" + kernels[0]["header"]
    for i, k in enumerate(kernels):
        params = ", ".join(f"const {t}* {n}, const int* {n}_shape" for n, t in zip(k["input_names"], TYPES))
        src += f"__global__ void k{i}({params}, __nv_bfloat16* y) {{\n{k['source']}\n}}\n"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.cu").write_text(src)
        r = subprocess.run(["nvcc", "-std=c++17", f"-arch={args.arch}", "-cubin", "-Xptxas", "-v",
                            "-o", f"{d}/k.cubin", f"{d}/k.cu"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    found, current = {}, None
    for line in r.stderr.splitlines():
        if m := re.search(r"entry function '_Z\d+k(\d+)", line):
            current = int(m.group(1))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            found.setdefault(current, {})["registers"] = int(m.group(1))
        if current is not None and (m := re.search(r"(\d+) bytes spill stores", line)):
            found.setdefault(current, {})["spill"] = int(m.group(1))
    print("| warps along K | depth | row tiles | token tiles | registers | spill stores (bytes) | blocks an SM |")
    print("|---|---|---|---|---|---|---|")
    for i, (wk, depth, rt, nt) in enumerate(CONFIGS):
        regs, spill = found[i]["registers"], found[i].get("spill", 0)
        print(f"| {wk} | {depth} | {rt} | {nt} | {regs} | {spill} | {blocks_per_sm(regs, wk)} |")


def blocks_per_sm(registers: int, warps: int) -> int:
    """Blocks of ``warps`` warps an sm_90 SM holds at that register count (registers
    are allocated per warp in units of 256, i.e. 8 a thread; 64 warps, 32 blocks an SM)."""
    per_warp = -(-registers // 8) * 8 * 32
    return min(65536 // (per_warp * warps), 64 // warps, 32)


if __name__ == "__main__":
    main()
