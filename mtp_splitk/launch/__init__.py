# Copyright © 2026 mtp_splitk contributors

"""Build the split-K kernels from kernels/ and launch them for a Plan.

The sources are read once; MLX compiles one variant per plan (mode, split,
token tiles, dtypes) on first use and caches it. ``cuda`` and ``metal`` build
the kernel objects; :func:`dense` and :func:`gather` make the calls for both.
"""

import mlx.core as mx

from ..plan import Plan
from . import cuda, metal
from .common import input_names, kernel_name, read_source


def _backend(plan: Plan):
    return cuda if plan.backend == "cuda" else metal


def dense(plan: Plan, x: mx.array, w: mx.array, scales: mx.array, biases, poison=None) -> mx.array:
    """y (M, N) = x (M, K) @ dequant(w).T with the planned kernel (CUDA or
    Metal, by ``plan.backend``).

    ``poison`` (tests only) pre-fills the output, e.g. with NaN, to prove the
    kernel writes every element; the normal path leaves it uninitialized.
    """
    kernel, template, grid, threadgroup = _backend(plan).dense_launch(plan, x.dtype, scales.dtype)
    inputs = [x, w, scales, biases] if biases is not None else [x, w, scales]
    return kernel(
        inputs=inputs,
        template=template,  # None on CUDA: the constants are in the body
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(x.shape[0], plan.N)],
        output_dtypes=[x.dtype],
        init_value=poison,
    )[0]


def gather(plan: Plan, x, w, scales, biases, idx, x_div: int, poison=None) -> mx.array:
    """y (P, N): pair p multiplies x row p // x_div by expert idx[p]."""
    P = idx.size
    threads = plan.warps_k * 32
    # Blocks for up to min(E, P) active experts times the row tiles of one
    # (grids count threads on both backends).
    blocks = min(w.shape[0], P) * plan.blocks
    inputs = [x, w, scales, biases, idx] if biases is not None else [x, w, scales, idx]
    kernel, template = _backend(plan).gather_launch(plan, x.dtype, scales.dtype, x_div)
    return kernel(
        inputs=inputs,
        template=template,
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(P, plan.N)],
        output_dtypes=[x.dtype],
        init_value=poison,
    )[0]
