# Copyright © 2026 mtp_splitk contributors

"""kernels/splitk_qmm.cu (the dense and grouped MoE kernels) compiled with g++
through the CUDA shim (tests/cuda_shim/, its MMA emulated) and run on the CPU,
as launch.dense and launch.gather build their calls: against a float32
reference and mx.quantized_matmul / mx.gather_qmm, NaN-poisoned outputs, rows
computed independently, and the lean K loop (Plan.lean) bit for bit the plain
one. It checks the kernels' C++ and data layout, not NVRTC or a GPU
(tests/test_kernels_gpu.py and tests/test_moe_gpu.py do that on the device)."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mtp_splitk import launch, plan as planner
from _cuda_shim import emulate

TOL = 1e-2  # bfloat16 operands
# (mode, bits, group size, K): the 4-bit fast path, generic affine, the float formats.
MODES = [("affine", 4, 64, 576), ("affine", 3, 32, 544), ("affine", 8, 128, 640), ("mxfp4", 4, 32, 544),
         ("nvfp4", 4, 16, 544)]
N = 40  # two full 16-row tiles and a partial one
# (warps along K, depth, row tiles) of the plain K loop; each also lean at one and two token tiles.
SPLITS = [(2, 1, 1), (4, 2, 1), (2, 2, 2)]
MS = (1, 3, 8, 13)


def quantized(shape, mode, bits, group_size, seed):
    mx.random.seed(seed)
    parts = mx.quantize((mx.random.normal(shape) * 0.05).astype(mx.bfloat16), group_size, bits, mode=mode)
    return parts[0], parts[1], (parts[2] if mode == "affine" else None)


def reference(x, wq, scales, biases, mode, bits, group_size):
    w = mx.dequantize(wq, scales, biases, group_size, bits, mode=mode).astype(mx.float32)
    return x.astype(mx.float32) @ w.T


def as_float32(x, scales, biases):
    """MLX's CPU op in float32: its bfloat16 path accumulates in bfloat16 (2% off the
    float32 reference at K = 576), the GPU's in float32."""
    wide = lambda a: a.astype(mx.float32) if a is not None and a.dtype == mx.bfloat16 else a
    return wide(x), wide(scales), wide(biases)


def mlx_op(x, wq, scales, biases, mode, bits, group_size):
    x, scales, biases = as_float32(x, scales, biases)
    return mx.quantized_matmul(x, wq, scales, biases, True, group_size, bits, mode)


def rel(y, ref):
    y, ref = np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert not np.isnan(y).any(), "unwritten (NaN-poisoned) outputs"
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def dense_cases():
    """(mode, bits, group size, K, M, split, lean) of every emulated dense call."""
    for mode, bits, group_size, K in MODES:
        for M in MS:
            for split in SPLITS:
                for lean in (False, True) if planner.token_tiles_for(M) <= 2 else (False,):
                    yield mode, bits, group_size, K, M, split, lean


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Every dense case's output, keyed by its case; the weights and inputs."""
    cases, data = list(dense_cases()), {}
    for i, (mode, bits, group_size, K) in enumerate(m[:4] for m in MODES):
        x = mx.random.normal((max(MS), K)).astype(mx.bfloat16)
        data[mode, bits] = (x, *quantized((N, K), mode, bits, group_size, seed=i))

    def launches():
        for mode, bits, group_size, K, M, (warps, depth, row_tiles), lean in cases:
            x, wq, scales, biases = data[mode, bits]
            tiles = planner.token_tiles_for(M)
            plan = planner.Plan("cuda", mode, bits, group_size, N, K, warps, tiles, depth,
                                row_tiles if tiles <= 2 else 1, lean)
            launch.dense(plan, x[:M], wq, scales, biases)

    outputs = emulate(launches, str(tmp_path_factory.mktemp("splitk_dense")), "splitk_dense")
    return {case: out[0] for case, out in zip(cases, outputs)}, data


@pytest.mark.parametrize("mode,bits,group_size,K", MODES, ids=lambda v: str(v))
def test_emulated_dense_kernel_matches_the_reference_and_mlx(dense, mode, bits, group_size, K):
    outputs, data = dense
    x, wq, scales, biases = data[mode, bits]
    for (m, b, _, _, M, split, lean), y in outputs.items():
        if (m, b) != (mode, bits):
            continue
        assert y.shape == (M, N)
        assert rel(y, reference(x[:M], wq, scales, biases, mode, bits, group_size)) < TOL, (M, split, lean)
        assert rel(y, mlx_op(x[:M], wq, scales, biases, mode, bits, group_size)) < TOL, (M, split, lean)


def test_emulated_lean_loop_is_the_plain_one_bit_for_bit(dense):
    outputs, _ = dense
    compared = 0
    for (mode, bits, group_size, K, M, split, lean), y in outputs.items():
        if lean:
            plain = outputs[mode, bits, group_size, K, M, split, False]
            assert mx.array_equal(y, plain).item(), (mode, bits, M, split)
            compared += 1
    assert compared == len(MODES) * 4 * len(SPLITS)  # M = 1, 3, 8 and 13 (two token tiles)


def test_emulated_rows_are_computed_independently(dense):
    """Row m of an M-row call is the 1-row call on row m, bit for bit, at every split."""
    outputs, _ = dense
    for (mode, bits, group_size, K, M, split, lean), y in outputs.items():
        one = outputs[mode, bits, group_size, K, 1, split, lean]
        assert mx.array_equal(y[:1], one).item(), (mode, bits, M, split, lean)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """The grouped kernel, unsorted routing (x_div = top_k), plain, lean and two row tiles."""
    E, K, top_k, M = 8, 256, 2, 3
    wq, scales, biases = quantized((E, N, K), "affine", 4, 64, seed=9)
    x = mx.random.normal((M, K)).astype(mx.bfloat16)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(E, top_k, replace=False) for _ in range(M)]).astype(np.uint32)
    base = planner.Plan("cuda", "affine", 4, 64, N, K, 2, 1, 1)
    plans = [base, dataclasses.replace(base, lean=True), dataclasses.replace(base, row_tiles=2, depth=2)]
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")  # mlx-lm's sorted call: x's rows in expert order, x_div = 1

    def launches():
        for plan in plans:
            launch.gather(plan, x, wq, scales, biases, mx.array(flat), top_k)
        launch.gather(base, x[mx.array(order // top_k)], wq, scales, biases, mx.array(flat[order]), 1)

    outputs = emulate(launches, str(tmp_path_factory.mktemp("splitk_gather")), "splitk_gather")
    return [o[0] for o in outputs], (x, wq, scales, biases, idx, top_k, order)


def test_emulated_grouped_kernel_matches_gather_qmm_and_its_variants_agree(grouped):
    (plain, lean, tiled, sorted_call), (x, wq, scales, biases, idx, top_k, order) = grouped
    M, K = x.shape
    deq = mx.dequantize(wq, scales, biases, 64, 4).astype(mx.float32)
    ref = mx.einsum("pk,pnk->pn", x.astype(mx.float32)[mx.array(np.arange(idx.size) // top_k)],
                    deq[mx.array(idx.reshape(-1))])
    xf, sf, bf = as_float32(x, scales, biases)
    theirs = mx.gather_qmm(xf.reshape(M, 1, 1, K), wq, sf, bf, rhs_indices=mx.array(idx), transpose=True)
    for y in (plain, lean, tiled):
        assert y.shape == (idx.size, N)
        assert rel(y, ref) < TOL and rel(y, theirs.reshape(idx.size, N)) < TOL
    assert mx.array_equal(lean, plain).item() and mx.array_equal(tiled, plain).item()
    # The sorted call's row i is pair order[i] of the unsorted one, bit for bit.
    assert mx.array_equal(sorted_call, plain[mx.array(order)]).item()


def test_emulated_fused_projections_are_each_weights_dense_kernel(tmp_path):
    """q, k and v in one launch (launch.dense_multi): each output the dense
    kernel's for that weight bit for bit, plain and lean."""
    K, Ns = 576, (40, 24, 24)
    weights = [quantized((n, K), "affine", 4, 64, seed=50 + i) for i, n in enumerate(Ns)]
    x = mx.random.normal((3, K)).astype(mx.bfloat16)
    cases = [(2, 1, False), (4, 2, True)]

    def launches():
        for warps, depth, lean in cases:
            members = tuple(planner.Plan("cuda", "affine", 4, 64, n, K, warps, 1, depth, 1, lean) for n in Ns)
            launch.dense_multi(planner.FusedPlan(members), x, weights)
            for plan, w in zip(members, weights):
                launch.dense(plan, x, *w)

    outputs = emulate(launches, str(tmp_path), "splitk_multi")
    for c in range(len(cases)):
        fused, singles = outputs[4 * c], [o[0] for o in outputs[4 * c + 1 : 4 * c + 4]]
        for y, alone, w in zip(fused, singles, weights):
            assert rel(y, reference(x, *w, "affine", 4, 64)) < TOL
            assert mx.array_equal(y, alone).item(), cases[c]
