"""The grouped MoE kernel against a float32 reference and mx.gather_qmm (GPU machine)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mtp_splitk import gather_qmm, plan as planner

pytestmark = pytest.mark.gpu

TOL = 1e-2  # bf16 operands
MODES = [("affine", 4, 64), ("affine", 3, 32), ("affine", 8, 128), ("mxfp4", 4, 32), ("mxfp8", 8, 32),
         ("nvfp4", 4, 16)]


def experts(E, N, K, mode, bits, group_size, seed):
    mx.random.seed(seed)
    parts = mx.quantize((mx.random.normal((E, N, K)) * 0.05).astype(mx.bfloat16), group_size, bits, mode=mode)
    return parts[0], parts[1], (parts[2] if mode == "affine" else None)


def routing(M, E, top_k, seed, mode="random"):
    rng = np.random.default_rng(seed)
    if mode == "one_expert":
        return np.full((M, top_k), rng.integers(E), dtype=np.uint32)
    if mode == "repeats":
        return rng.integers(0, min(E, 3), size=(M, top_k)).astype(np.uint32)
    return np.stack([rng.choice(E, top_k, replace=False) for _ in range(M)]).astype(np.uint32)


def reference(x2d, w, s, b, idx_flat, x_div, mode, bits, group_size):
    deq = mx.dequantize(w, s, b, group_size, bits, mode=mode).astype(mx.float32)  # (E, N, K)
    rows = x2d.astype(mx.float32)[mx.array(np.arange(idx_flat.size) // x_div)]
    return mx.einsum("pk,pnk->pn", rows, deq[mx.array(idx_flat)])


def rel_err(y, ref):
    y = np.array(y.astype(mx.float32)).reshape(ref.shape)
    ref = np.array(ref)
    assert not np.isnan(y).any(), "unwritten or NaN outputs"
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def call(x, w, s, b, idx, mode, bits, group_size, sorted_indices, warps=2, poison=True):
    """The op with the kernel forced on; outputs NaN-poisoned first."""
    from mtp_splitk import launch

    planner.set_split(warps)
    original = launch.gather
    if poison:
        launch.gather = lambda *a, **k: original(*a, **k, poison=math.nan)
    try:
        return gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=group_size, bits=bits,
                          mode=mode, sorted_indices=sorted_indices)
    finally:
        launch.gather = original
        planner.set_split(None)


@pytest.mark.parametrize("mode,bits,group_size", MODES)
@pytest.mark.parametrize("E,top_k", [(8, 2), (128, 8), (512, 4), (16, 1)])
def test_unsorted_matches_reference(mode, bits, group_size, E, top_k):
    N, K = 200, 544 if group_size <= 32 else 640
    w, s, b = experts(E, N, K, mode, bits, group_size, seed=E + bits)
    for M in (1, 5, 17):
        idx = routing(M, E, top_k, seed=M)
        x = mx.random.normal((M, 1, 1, K)).astype(mx.bfloat16)
        y = call(x, w, s, b, mx.array(idx), mode, bits, group_size, False)
        assert y.shape == (M, top_k, 1, N)
        ref = reference(x.reshape(M, K), w, s, b, idx.reshape(-1), top_k, mode, bits, group_size)
        assert rel_err(y, ref) < TOL, (mode, E, top_k, M)


@pytest.mark.parametrize("pattern", ["random", "one_expert", "repeats"])
@pytest.mark.parametrize("M", [1, 8, 64])
def test_sorted_and_crowded_routing(pattern, M):
    E, N, K, top_k = 64, 256, 1024, 8
    w, s, b = experts(E, N, K, "affine", 4, 64, seed=7)
    idx = routing(M, E, top_k, seed=M, mode=pattern).reshape(-1)
    order = np.argsort(idx, kind="stable")
    x = mx.random.normal((M, K)).astype(mx.bfloat16)
    xs = x[mx.array(order // top_k)].reshape(-1, 1, K)
    y = call(xs, w, s, b, mx.array(idx[order]), "affine", 4, 64, True)
    assert y.shape == (M * top_k, 1, N)
    ref = reference(xs.reshape(-1, K), w, s, b, idx[order], 1, "affine", 4, 64)
    assert rel_err(y, ref) < TOL
    theirs = mx.gather_qmm(xs, w, s, b, rhs_indices=mx.array(idx[order]), transpose=True, sorted_indices=True)
    assert rel_err(y, theirs.astype(mx.float32).reshape(ref.shape)) < TOL


def test_batch_invariance():
    """A (token, expert) pair gives the same bits whatever else is in the batch."""
    E, N, K, top_k = 32, 512, 2048, 4
    w, s, b = experts(E, N, K, "affine", 4, 64, seed=3)
    idx = routing(17, E, top_k, seed=5)
    x = mx.random.normal((17, 1, 1, K)).astype(mx.bfloat16)
    full = call(x, w, s, b, mx.array(idx), "affine", 4, 64, False)
    for m in range(17):
        one = call(x[m : m + 1], w, s, b, mx.array(idx[m : m + 1]), "affine", 4, 64, False)
        assert mx.array_equal(one[0], full[m]).item(), m


def test_planner_leaves_global_scale_and_lhs_indices_to_mlx():
    E, N, K = 8, 64, 256
    w, s, b = experts(E, N, K, "affine", 4, 64, seed=1)
    x = mx.random.normal((3, 1, 1, K)).astype(mx.bfloat16)
    idx = mx.array(routing(3, E, 2, seed=1))
    lhs = mx.array(np.arange(3, dtype=np.uint32)[:, None].repeat(2, 1))
    planner.set_split(2)
    try:
        ours = gather_qmm(x, w, s, b, lhs_indices=lhs, rhs_indices=idx)
    finally:
        planner.set_split(None)
    assert mx.array_equal(ours, mx.gather_qmm(x, w, s, b, lhs_indices=lhs, rhs_indices=idx)).item()


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 64), ("affine", 8, 128), ("mxfp4", 4, 32)])
@pytest.mark.parametrize("warps,depth,row_tiles,lean", [(1, 1, 1, False), (2, 3, 1, False), (4, 2, 1, False),
                                                     (2, 1, 2, False), (2, 2, 1, True)])
def test_gather_glu_is_the_grouped_kernel_then_mlx_swiglu_bit_for_bit(mode, bits, group_size, warps, depth,
                                                                       row_tiles, lean):
    """SwitchGLU's gate/up in one grouped launch: g and u as the grouped kernel
    stores them, then mlx-lm's swiglu, bit for bit, unsorted (x_div = top_k) and
    sorted (x_div = 1) calls, every output written (NaN poison)."""
    from mlx_lm.models.activations import swiglu

    from mtp_splitk import launch

    E, N, K, top_k = 32, 200, 640 if group_size != 32 else 544, 4
    gate, up = (experts(E, N, K, mode, bits, group_size, seed=s) for s in (21, 22))
    plan = planner.Plan("cuda", mode, bits, group_size, N, K, warps, 1, depth, row_tiles, lean)
    for M in (1, 5, 17):
        idx = routing(M, E, top_k, seed=M).reshape(-1)
        x = (mx.random.normal((M, K)) * 4).astype(mx.bfloat16)  # gate values across silu's range
        order = np.argsort(idx, kind="stable")
        for xs, ids, x_div in ((x, idx, top_k), (x[mx.array(order // top_k)], idx[order], 1)):
            ids = mx.array(ids)
            y = launch.gather_glu(plan, xs, gate, up, ids, x_div, poison=math.nan)
            assert not mx.isnan(y).any().item(), "unwritten outputs"
            g = launch.gather(plan, xs, *gate, ids, x_div)
            u = launch.gather(plan, xs, *up, ids, x_div)
            mismatched = (y != swiglu(g, u)).sum().item()
            assert y.shape == (M * top_k, N) and mismatched == 0, (mode, warps, depth, M, x_div, mismatched)


@pytest.mark.parametrize("row_tiles,depth,lean", [(2, 1, False), (2, 2, False), (1, 1, True), (2, 2, True)])
def test_row_tiles_and_lean_change_no_bit_of_the_grouped_kernel(row_tiles, depth, lean):
    """Row tiles (several 16-row tiles a block, sharing each x fragment; a
    candidate for small pair counts) and the lean K loop (Plan.lean) decide
    only which warp computes a row and when: every output equals the one-tile
    kernel's bit for bit and the float32 reference within rounding, N not a
    multiple of the tiles, every output written (NaN poison)."""
    from mtp_splitk import launch

    E, N, K, top_k = 128, 200, 768, 8  # Qwen3-30B-A3B's down K and routing, an odd N
    w, s, b = experts(E, N, K, "affine", 4, 64, seed=31)
    one = planner.Plan("cuda", "affine", 4, 64, N, K, 2, 1, 1)
    plan = planner.Plan("cuda", "affine", 4, 64, N, K, 2, 1, depth, row_tiles, lean)
    for M in (1, 5):
        idx = routing(M, E, top_k, seed=40 + M).reshape(-1)
        x = mx.random.normal((M, K)).astype(mx.bfloat16)
        ids = mx.array(idx)
        y = launch.gather(plan, x, w, s, b, ids, top_k, poison=math.nan)
        assert rel_err(y, reference(x, w, s, b, idx, top_k, "affine", 4, 64)) < TOL
        assert mx.array_equal(y, launch.gather(one, x, w, s, b, ids, top_k)).item(), (row_tiles, depth, M)
