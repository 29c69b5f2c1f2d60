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

from ..plan import Plan
from .common import input_names, kernel_name, read_source, template

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
