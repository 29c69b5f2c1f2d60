"""The CUDA split-K kernel against mx.quantized_matmul (run on the GPU machine).

Every check draws fresh random inputs, poisons the output with NaN first (so
an unwritten element fails), and measures ||y - ref|| / ||ref|| against a
float32 reference built from mx.dequantize.
"""

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest

from mtp_splitk import launch, plan as planner
from mtp_splitk.ops import quantized_matmul

pytestmark = pytest.mark.gpu

# bf16 operands: the relative error of a K-long dot product lands near 2^-9.
TOL = {mx.bfloat16: 1e-2, mx.float16: 3e-3}

MODES = [("affine", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)] + [
    ("mxfp4", 4, 32),
    ("mxfp8", 8, 32),
    ("nvfp4", 4, 16),
]


def quantized(N, K, mode, bits, group_size, dtype, seed):
    mx.random.seed(seed)
    w = mx.random.normal((N, K)) * 0.05
    parts = mx.quantize(w.astype(dtype), group_size, bits, mode=mode)
    wq, scales = parts[0], parts[1]
    biases = parts[2] if mode == "affine" else None
    return wq, scales, biases


def reference(x, wq, scales, biases, mode, bits, group_size):
    w = mx.dequantize(wq, scales, biases, group_size, bits, mode=mode)
    return x.astype(mx.float32) @ w.astype(mx.float32).T


def rel_err(y, ref):
    y = np.array(y.astype(mx.float32))
    ref = np.array(ref)
    assert not np.isnan(y).any(), "unwritten (NaN-poisoned) or NaN outputs"
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def run_kernel(x, wq, scales, biases, mode, bits, group_size, warps_k=None, poison=math.nan):
    """The kernel through the real planner (forced on), output poisoned first."""
    M, K = x.shape
    N = wq.shape[0]
    planner.set_split(warps_k or planner.choose_warps_k(N, K, 132))
    try:
        plan = planner.plan_dense(M, N, K, bits, group_size, mode, x.dtype)
    finally:
        planner.set_split(None)
    assert plan is not None
    return launch.dense(plan, x, wq, scales, biases, poison=poison)


@pytest.mark.parametrize("mode,bits,group_size", MODES)
def test_every_mode_matches_reference(mode, bits, group_size):
    # N not a multiple of 16; K % 128 != 0 where the group size allows it (a
    # partial last chunk). M values cover the token-tile variants 1, 2 and 8.
    N, K = 1000, {16: 544, 32: 544, 64: 576, 128: 640}[group_size]
    for dtype in (mx.bfloat16, mx.float16):
        wq, scales, biases = quantized(N, K, mode, bits, group_size, dtype, seed=bits * 7 + group_size)
        for M in (1, 3, 13, 64) if dtype == mx.bfloat16 else (5,):
            x = mx.random.normal((M, K)).astype(dtype)
            ref = reference(x, wq, scales, biases, mode, bits, group_size)
            err = rel_err(run_kernel(x, wq, scales, biases, mode, bits, group_size), ref)
            assert err < TOL[dtype], (mode, bits, group_size, dtype, M, err)


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32)])
def test_close_to_mx_quantized_matmul(mode, bits, group_size):
    """The same function as MLX's op (which rounds differently), at decode sizes."""
    N, K = 4096, 4096
    wq, scales, biases = quantized(N, K, mode, bits, group_size, mx.bfloat16, seed=21)
    for M in (1, 4):
        x = mx.random.normal((M, K)).astype(mx.bfloat16)
        theirs = mx.quantized_matmul(x, wq, scales, biases, True, group_size, bits, mode)
        ours = run_kernel(x, wq, scales, biases, mode, bits, group_size)
        assert rel_err(ours, theirs.astype(mx.float32)) < TOL[mx.bfloat16], (mode, M)


@pytest.mark.parametrize("N,K", [(17, 128), (4096, 4096), (2048, 768), (1024, 2880), (4099, 14336)])
@pytest.mark.parametrize("warps_k", [1, 4, 8])
def test_shapes_and_splits(N, K, warps_k):
    wq, scales, biases = quantized(N, K, "affine", 4, 64, mx.bfloat16, seed=N + K + warps_k)
    for M in (1, 2, 5, 16, 17, 40):
        x = mx.random.normal((M, K)).astype(mx.bfloat16)
        ref = reference(x, wq, scales, biases, "affine", 4, 64)
        err = rel_err(run_kernel(x, wq, scales, biases, "affine", 4, 64, warps_k), ref)
        assert err < TOL[mx.bfloat16], (N, K, warps_k, M, err)


@pytest.mark.parametrize("mode,bits,group_size", MODES)
def test_lean_k_loop_is_the_plain_one_bit_for_bit(mode, bits, group_size):
    """Plan.lean (dequantized per 16-byte x load, fewer registers) makes the same
    MMAs in the same order: every output equals the plain K loop's bit for bit,
    at one and two token tiles, depths 1-3 and 1-2 row tiles, every output written."""
    N, K = 1000, {16: 544, 32: 544, 64: 576, 128: 640}[group_size]
    wq, scales, biases = quantized(N, K, mode, bits, group_size, mx.bfloat16, seed=bits * 5 + group_size)
    for M in (1, 3, 8, 12, 16):  # one and two token tiles
        x = mx.random.normal((M, K)).astype(mx.bfloat16)
        ref = reference(x, wq, scales, biases, mode, bits, group_size)
        for depth, row_tiles in ((1, 1), (2, 1), (3, 1), (2, 2)):
            plan = planner.Plan("cuda", mode, bits, group_size, N, K, 4, planner.token_tiles_for(M), depth, row_tiles)
            plain = launch.dense(plan, x, wq, scales, biases, poison=math.nan)
            lean = launch.dense(dataclasses.replace(plan, lean=True), x, wq, scales, biases, poison=math.nan)
            assert rel_err(lean, ref) < TOL[mx.bfloat16], (mode, M, depth, row_tiles)
            assert mx.array_equal(lean, plain).item(), (mode, bits, group_size, M, depth, row_tiles)


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 64), ("affine", 3, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)])
def test_batch_invariance(mode, bits, group_size):
    """Row m of an M-row call equals, bit for bit, the 1-row call on that row."""
    N, K = 2000, 2048
    wq, scales, biases = quantized(N, K, mode, bits, group_size, mx.bfloat16, seed=3)
    x = mx.random.normal((64, K)).astype(mx.bfloat16)
    singles = [run_kernel(x[m : m + 1], wq, scales, biases, mode, bits, group_size) for m in range(64)]
    for M in (2, 5, 8, 9, 17, 64):
        y = run_kernel(x[:M], wq, scales, biases, mode, bits, group_size)
        for m in range(M):
            assert mx.array_equal(y[m : m + 1], singles[m]).item(), (mode, M, m)


def test_op_plans_the_kernel_and_falls_back():
    """The public op takes the kernel when forced and MLX's path when off."""
    N, K = 4096, 4096
    wq, scales, biases = quantized(N, K, "affine", 4, 64, mx.bfloat16, seed=11)
    x = mx.random.normal((2, 3, K)).astype(mx.bfloat16)  # leading dims
    ref = reference(x.reshape(6, K), wq, scales, biases, "affine", 4, 64).reshape(2, 3, N)
    try:
        planner.set_split(8)
        assert planner.plan_dense(6, N, K, 4, 64, "affine", mx.bfloat16) is not None
        y = quantized_matmul(x, wq, scales, biases)
        assert y.shape == (2, 3, N) and rel_err(y, ref) < TOL[mx.bfloat16]
        planner.set_split(0)
        assert planner.plan_dense(6, N, K, 4, 64, "affine", mx.bfloat16) is None
        y = quantized_matmul(x, wq, scales, biases)
        expected = mx.quantized_matmul(x, wq, scales, biases)
        assert mx.array_equal(y, expected).item()
    finally:
        planner.set_split(None)


def test_float32_and_transpose_false_stay_on_mlx():
    N, K = 256, 512
    wq, scales, biases = quantized(N, K, "affine", 4, 64, mx.float32, seed=5)
    x = mx.random.normal((3, K))
    planner.set_split(8)
    try:
        assert mx.array_equal(quantized_matmul(x, wq, scales, biases), mx.quantized_matmul(x, wq, scales, biases)).item()
    finally:
        planner.set_split(None)
