# Copyright © 2026 mtp_splitk contributors

"""Build the split-K kernels from kernels/ and launch them for a Plan.

The sources are read once, at import; MLX compiles one variant per template
tuple (shape, mode, split, token tiles) on first use and caches it.
"""

import os
from functools import lru_cache

import mlx.core as mx

from .plan import ROWS_PER_TILE, Plan

MODE_IDS = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}
_CORE = "quant_core.h"


def _kernel_dir() -> str:
    # Installed wheels carry kernels/ as the package mtp_splitk.kernels; a
    # checkout on PYTHONPATH has it beside the package.
    try:
        from importlib.resources import files

        path = str(files("mtp_splitk.kernels"))
        if os.path.exists(os.path.join(path, _CORE)):
            return path
    except ModuleNotFoundError:
        pass
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "kernels")


def read_source(name: str) -> str:
    """A kernel file with ``#include "quant_core.h"`` expanded (JIT compilers
    see no include path of ours)."""
    directory = _kernel_dir()
    with open(os.path.join(directory, name)) as f:
        text = f.read()
    with open(os.path.join(directory, _CORE)) as f:
        core = f.read()
    return text.replace(f'#include "{_CORE}"', core)


@lru_cache(maxsize=None)
def _cuda_kernel(affine: bool, shared_memory: int):
    # MLX fixes the dynamic shared memory per kernel object, hence one per size.
    inputs = ["x", "w", "scales", "biases"] if affine else ["x", "w", "scales"]
    biases = "biases" if affine else "(const uint8_t*)nullptr"
    source = (
        "splitk_qmm<T, TS, MODE, BITS, G, WK, NT, FAST4, DEPTH>"
        f"(x, w, scales, {biases}, y, x_shape[0], w_shape[0], x_shape[1]);"
    )
    return mx.fast.cuda_kernel(
        name="mtp_splitk_qmm_affine" if affine else "mtp_splitk_qmm_fp",
        input_names=inputs,
        output_names=["y"],
        source=source,
        header=read_source("splitk_qmm.cu"),
        shared_memory=shared_memory,
    )


def dense(plan: Plan, x: mx.array, w: mx.array, scales: mx.array, biases, poison=None) -> mx.array:
    """y (M, N) = x (M, K) @ dequant(w).T with the planned kernel.

    ``poison`` (tests only) pre-fills the output, e.g. with NaN, to prove the
    kernel writes every element; the normal path leaves it uninitialized.
    """
    if plan.backend != "cuda":
        from .launch_metal import dense as metal_dense

        return metal_dense(plan, x, w, scales, biases)
    M = x.shape[0]
    affine = plan.mode == "affine"
    fast4 = affine and plan.bits == 4 and scales.dtype == x.dtype
    threads = plan.warps_k * 32
    inputs = [x, w, scales, biases] if affine else [x, w, scales]
    # Partial tiles of the fixed-order reduction: [WK][NT][32 lanes] float4.
    shared_memory = plan.warps_k * plan.token_tiles * 32 * 16
    return _cuda_kernel(affine, shared_memory)(
        inputs=inputs,
        template=[
            ("T", x.dtype),
            ("TS", scales.dtype),
            ("MODE", MODE_IDS[plan.mode]),
            ("BITS", plan.bits),
            ("G", plan.group_size),
            ("WK", plan.warps_k),
            ("NT", plan.token_tiles),
            ("FAST4", fast4),
            ("DEPTH", plan.depth),
        ],
        grid=(plan.blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(M, plan.N)],
        output_dtypes=[x.dtype],
        init_value=poison,
    )[0]
