# Copyright © 2026 mtp_splitk contributors

"""Launch the split-K kernels on Apple GPUs through mx.fast.metal_kernel.

The kernel objects for a Plan, with the CUDA path's constants (as template
arguments), input names, grid and threadgroup; launch.dense and
launch.gather make the calls for both backends.
kernels/splitk_qmm.metal has been compiled and run only as C++ on a Linux CPU
(tests/test_metal.py); it has not been run on an Apple GPU.
"""

from functools import lru_cache

import mlx.core as mx

from ..plan import FusedPlan, Plan
from .common import input_names, kernel_name, multi_input_names, read_source, template

# Metal declares threadgroup memory in the kernel function itself (MLX's
# metal_kernel has no dynamic size), so the bodies declare it, sized from
# the template constants, and pass it to the header's functions.
_DENSE_BODY = """
threadgroup float partial[WK * RT * 128];
splitk_qmm<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH>(
    x, w, scales, {biases}, y, x_shape[0], w_shape[0], x_shape[1], partial,
    threadgroup_position_in_grid.x, simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
"""

_GATHER_BODY = """
threadgroup atomic_uint active[kMaxExperts / 32];
threadgroup int pairs[kMaxPairs];
threadgroup int info[2 + WK];
threadgroup float partial[WK * RT * 128];
splitk_gather_qmm<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH>(
    x, w, scales, {biases}, idx, y, idx_shape[0], w_shape[0], w_shape[1], x_shape[1], XDIV,
    active, pairs, info, partial,
    threadgroup_position_in_grid.x, simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
"""


@lru_cache(maxsize=None)
def _metal_kernel(affine: bool, gather: bool):
    # The fp modes have no biases input; their (never read) biases argument is
    # the scales pointer, which keeps one pointer type and needs no nullptr.
    body = (_GATHER_BODY if gather else _DENSE_BODY).format(biases="biases" if affine else "scales")
    header = read_source("splitk_qmm.metal")
    return mx.fast.metal_kernel(
        name=kernel_name("gather" if gather else "qmm", affine, header, body),
        input_names=input_names(affine, gather),
        output_names=["y"],
        source=body,
        header=header,
        ensure_row_contiguous=True,
    )


@lru_cache(maxsize=4096)
def dense_launch(plan: Plan, dtype, scales_dtype):
    """Everything about a dense launch except the arrays, built once per plan
    (launch.dense makes the call)."""
    threads = plan.warps_k * 32
    return (
        _metal_kernel(plan.mode == "affine", False),
        template(plan, dtype, scales_dtype),
        (plan.blocks * threads, 1, 1),  # MLX's Metal grid counts threads, not threadgroups
        (threads, 1, 1),
    )


@lru_cache(maxsize=4096)
def gather_launch(plan: Plan, dtype, scales_dtype, x_div: int):
    """The grouped kernel and its template for a plan (launch.gather makes
    the call; the grid depends on the call)."""
    return _metal_kernel(plan.mode == "affine", True), template(plan, dtype, scales_dtype) + [("XDIV", x_div)]


_MULTI_BODY = """
threadgroup float partial[WK * RT * 128];
splitk_qmm_multi<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH>(
    x, x_shape[0], x_shape[1], {slots}, partial,
    threadgroup_position_in_grid.x, simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
"""


@lru_cache(maxsize=None)
def _multi_kernel(affine: bool, count: int):
    # A missing third weight repeats the second with N2 = 0 (never selected).
    slots = []
    for i in range(3):
        j = min(i, count - 1)
        slots.append(f"w{j}, scales{j}, {f'biases{j}' if affine else f'scales{j}'}, y{j}, N{i}")
    body = _MULTI_BODY.format(slots=", ".join(slots))
    header = read_source("splitk_qmm.metal")
    return mx.fast.metal_kernel(
        name=kernel_name(f"multi{count}", affine, header, body),
        input_names=multi_input_names(affine, count),
        output_names=[f"y{i}" for i in range(count)],
        source=body,
        header=header,
        ensure_row_contiguous=True,
    )


@lru_cache(maxsize=1024)
def multi_launch(plan: FusedPlan, dtype, scales_dtype):
    """The fused launch of 2 or 3 weights: (kernel, template, grid,
    threadgroup); each weight's N is a template constant (N2 = 0 for two)."""
    lead, count = plan.members[0], len(plan.members)
    sizes = [("N0", lead.N), ("N1", plan.members[1].N), ("N2", plan.members[2].N if count == 3 else 0)]
    threads = lead.warps_k * 32
    return (
        _multi_kernel(lead.mode == "affine", count),
        template(lead, dtype, scales_dtype) + sizes,
        (plan.blocks * threads, 1, 1),
        (threads, 1, 1),
    )
