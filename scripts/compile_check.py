#!/usr/bin/env python3
"""Compile the CUDA kernels (split-K matmuls, Gated DeltaNet) for sm_90a with nvcc, no GPU needed, and print the
resource report (registers, spills, shared memory) per variant.

Mirrors what mx.fast.cuda_kernel generates (a __global__ wrapper around the
body), so errors and spills show up before any device time is spent.
Usage: python -m scripts.compile_check [--sass]
"""
import argparse
import os
import subprocess
import sys
import tempfile

from mtp_splitk.launch import read_source

PRELUDE = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n"

# (name, T, TS, MODE, BITS, G, N, K, WK, NT, RT, FAST4); N and K are run-time values; each
# variant of one or two token tiles also as its lean K loop (Plan.lean)
VARIANTS = [
    ("affine4_nt1_rt1", "__nv_bfloat16", "__nv_bfloat16", 0, 4, 64, 4096, 4096, 4, 1, 1, "true"),
    ("affine4_nt1_rt2", "__nv_bfloat16", "__nv_bfloat16", 0, 4, 64, 4096, 4096, 4, 1, 2, "true"),
    ("affine4_nt2_rt2", "__nv_bfloat16", "__nv_bfloat16", 0, 4, 64, 4096, 4096, 4, 2, 2, "true"),
    ("affine4_nt4_rt1", "__nv_bfloat16", "__nv_bfloat16", 0, 4, 64, 4096, 4096, 4, 4, 1, "true"),
    ("affine4_nt8_rt1", "__nv_bfloat16", "__nv_bfloat16", 0, 4, 64, 4096, 4096, 4, 8, 1, "true"),
    ("affine4_generic", "__nv_bfloat16", "__nv_bfloat16", 0, 4, 64, 4096, 4096, 4, 1, 1, "false"),
    ("affine3_fp16", "__half", "__half", 0, 3, 32, 4096, 4096, 4, 2, 1, "false"),
    ("affine8_bf16", "__nv_bfloat16", "__nv_bfloat16", 0, 8, 128, 4096, 4096, 4, 1, 1, "false"),
    ("mxfp4", "__nv_bfloat16", "uint8_t", 1, 4, 32, 4096, 4096, 4, 1, 1, "false"),
    ("nvfp4", "__nv_bfloat16", "uint8_t", 3, 4, 16, 4096, 4096, 4, 1, 1, "false"),
]

# (name, T, TB, DK, WARPS, ALL_STATES)
GATED_DELTA = [
    ("gated_delta_bf16_dk128_all", "__nv_bfloat16", "__nv_bfloat16", 128, 4, "true"),
    ("gated_delta_bf16_dk128_last", "__nv_bfloat16", "__nv_bfloat16", 128, 4, "false"),
    ("gated_delta_f16_dk256_all", "__half", "float", 256, 4, "true"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", action="store_true", help="dump SASS of the first variant")
    args = ap.parse_args()
    src = PRELUDE + read_source("splitk_qmm.cu")
    for v in VARIANTS:
        name, T, TS, mode, bits, g, n, k, wk, nt, rt, fast4 = v
        biases = "biases" if mode == 0 else "(const uint8_t*)nullptr"
        for lean in ("false", "true") if nt <= 2 else ("false",):
            src += (
                f"\n__global__ void {name}{'_lean' if lean == 'true' else ''}(const {T}* x, const uint32_t* w,"
                f" const {TS}* scales, const {TS}* biases, {T}* y, int M) {{\n"
                f"  splitk_qmm<{T}, {TS}, {mode}, {bits}, {g}, {wk}, {nt}, {rt}, {fast4}, 2, {lean}>"
                f"(x, w, scales, {biases}, y, M, {n}, {k});\n}}\n"
            )
    # The grouped kernel at 1 and 2 row tiles a block (scripts/profile_kernel.py --moe), each lean too.
    for rt in (1, 2):
        for lean in ("false", "true"):
            src += (
                f"\n__global__ void gather_affine4_rt{rt}{'_lean' if lean == 'true' else ''}(const __nv_bfloat16* x,"
                " const uint32_t* w, const __nv_bfloat16* s, const __nv_bfloat16* b, const uint32_t* idx,"
                " __nv_bfloat16* y, int P, int E, int N, int K, int d) {\n"
                f"  splitk_gather_qmm<__nv_bfloat16, __nv_bfloat16, 0, 4, 64, 2, 1, {rt}, true, 1, {lean}>"
                "(x, w, s, b, idx, y, P, E, N, K, d);\n}\n"
            )
    # The Gated DeltaNet recurrence (kernels/gated_delta.cu): every state kept, and the last only.
    src += read_source("gated_delta.cu")
    for name, T, TB, dk, warps, keep in GATED_DELTA:
        src += (
            f"\n__global__ void {name}(const {T}* q, const {T}* k, const {T}* v, const float* g, const {TB}* beta,"
            f" const float* state, {T}* y, float* states, const int* q_shape, const int* v_shape) {{\n"
            f"  gated_delta_rows<{T}, {TB}, {dk}, {warps}, {keep}>(q, k, v, g, beta, state, y, states,"
            " q_shape[0], q_shape[1], q_shape[2], v_shape[2], v_shape[3]);\n}\n"
        )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "check.cu")
        open(path, "w").write(src)
        cmd = ["nvcc", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
               "-Xptxas", "-v", "-o", os.path.join(d, "check.cubin"), path]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout + r.stderr)
        if r.returncode:
            sys.exit(r.returncode)
        if args.sass:
            out = subprocess.run(["cuobjdump", "-sass", os.path.join(d, "check.cubin")],
                                 capture_output=True, text=True).stdout
            print(out[:60000])


if __name__ == "__main__":
    main()
