# Copyright © 2026 mtp_splitk contributors

"""Build the split-K kernels from kernels/ and launch them for a Plan.

The sources are read once; MLX compiles one variant per plan (mode, split,
token tiles, dtypes) on first use and caches it. On CUDA each variant is its
own kernel object whose body names the plan's constants, and whose header
only #includes the kernel file: both keep MLX's per-call work small.
"""

import hashlib
import os
from functools import lru_cache

import mlx.core as mx

from .plan import Plan

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


@lru_cache(maxsize=None)
def read_source(name: str) -> str:
    """A kernel file with ``#include "quant_core.h"`` expanded (JIT compilers
    see no include path of ours)."""
    directory = _kernel_dir()
    with open(os.path.join(directory, name)) as f:
        text = f.read()
    with open(os.path.join(directory, _CORE)) as f:
        core = f.read()
    return _strip_comments(text.replace(f'#include "{_CORE}"', core))


def _strip_comments(source: str) -> str:
    """Drop // comments and blank lines: MLX rebuilds and hashes the kernel
    source on every call, so its length is per-call host time."""
    lines = []
    for line in source.splitlines():
        code = (line.split("//", 1)[0] if "//" in line else line).strip()
        if code:
            lines.append(code)
    return "\n".join(lines) + "\n"


def kernel_name(kind: str, affine: bool, header: str, source: str) -> str:
    """A name that changes with the kernel's text. MLX's CUDA backend caches
    compiled kernels on disk by name alone (in $MLX_PTX_CACHE_DIR, else
    <tmp>/mlx/<version>/ptx), so a fixed name would run the previous
    version's binary after an upgrade of this package."""
    digest = hashlib.sha1((header + source).encode()).hexdigest()[:10]
    return f"mtp_splitk_{kind}_{'affine' if affine else 'fp'}_{digest}"


def input_names(affine: bool, gather: bool):
    """The kernels' inputs, on both backends: the fp modes have no biases."""
    names = ["x", "w", "scales", "biases"] if affine else ["x", "w", "scales"]
    return names + ["idx"] if gather else names


# What mx.fast.cuda_kernel declares each dtype as in the kernel it generates.
_CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.uint8: "uint8_t"}


@lru_cache(maxsize=None)
def _cuda_header() -> str:
    """The kernel file for NVRTC, by absolute path when that can be spelled in
    an #include: MLX copies a kernel's header text into every call's
    primitive, and the measured per-op cost grew with it (scripts/
    bench_launch.py), so only the include line travels."""
    path = os.path.join(_kernel_dir(), "splitk_qmm.cu").replace(os.sep, "/")
    if os.path.isabs(path) and not any(c in path for c in '"\\\n'):
        return f'#include "{path}"\n'
    return read_source("splitk_qmm.cu")


def _cuda_call(function: str, plan: Plan, dtype, scales_dtype) -> str:
    """The body: one call of the kernel's function with the plan's constants
    written in. MLX's template arguments cost time on every call (bench_launch)."""
    values = []
    for name, v in _template(plan, dtype, scales_dtype):
        if isinstance(v, bool):
            values.append("true" if v else "false")
        elif isinstance(v, int):
            values.append(str(v))
        elif v in _CUDA_TYPES:
            values.append(_CUDA_TYPES[v])
        else:
            raise ValueError(f"no CUDA type for {name} = {v}")
    return f"{function}<{', '.join(values)}>"


def _cuda_kernel(kind: str, plan: Plan, body: str):
    # Our kernel text, not the include line, names it: an edit of the file
    # must change the name (see kernel_name).
    affine = plan.mode == "affine"
    return mx.fast.cuda_kernel(
        name=kernel_name(kind, affine, read_source("splitk_qmm.cu"), body),
        input_names=input_names(affine, kind == "gather"),
        output_names=["y"],
        source=body,
        header=_cuda_header(),
        shared_memory=_shared_memory(plan),  # fixed per kernel object by MLX
    )


def _template(plan: Plan, dtype, scales_dtype):
    affine = plan.mode == "affine"
    return [
        ("T", dtype),
        ("TS", scales_dtype),
        ("MODE", MODE_IDS[plan.mode]),
        ("BITS", plan.bits),
        ("G", plan.group_size),
        ("WK", plan.warps_k),
        ("NT", plan.token_tiles),
        ("RT", plan.row_tiles),
        ("FAST4", affine and plan.bits == 4 and scales_dtype == dtype),
        ("DEPTH", plan.depth),
    ]


def _shared_memory(plan: Plan) -> int:
    # Partial tiles of the fixed-order reduction: [WK][NT][RT][32 lanes] float4.
    return plan.warps_k * plan.token_tiles * plan.row_tiles * 32 * 16


@lru_cache(maxsize=4096)
def _cuda_launch(plan: Plan, dtype, scales_dtype):
    """Everything about a dense launch except the arrays, built once per plan."""
    affine = plan.mode == "affine"
    biases = "biases" if affine else "(const uint8_t*)nullptr"
    body = (_cuda_call("splitk_qmm", plan, dtype, scales_dtype)
            + f"(x, w, scales, {biases}, y, x_shape[0], w_shape[0], x_shape[1]);")
    threads = plan.warps_k * 32
    return (_cuda_kernel("qmm", plan, body), None, (plan.blocks * threads, 1, 1), (threads, 1, 1))


@lru_cache(maxsize=4096)
def _cuda_gather_launch(plan: Plan, dtype, scales_dtype, x_div: int):
    """The grouped kernel and its template (None) for a plan."""
    affine = plan.mode == "affine"
    biases = "biases" if affine else "(const uint8_t*)nullptr"
    body = (_cuda_call("splitk_gather_qmm", plan, dtype, scales_dtype)
            + f"(x, w, scales, {biases}, idx, y, idx_shape[0], w_shape[0], w_shape[1], x_shape[1], {x_div});")
    return _cuda_kernel("gather", plan, body), None


def _dense_launch(plan: Plan, dtype, scales_dtype):
    if plan.backend == "cuda":
        return _cuda_launch(plan, dtype, scales_dtype)
    from .launch_metal import dense_launch

    return dense_launch(plan, dtype, scales_dtype)


def _gather_launch(plan: Plan, dtype, scales_dtype, x_div: int):
    if plan.backend == "cuda":
        return _cuda_gather_launch(plan, dtype, scales_dtype, x_div)
    from .launch_metal import gather_launch

    return gather_launch(plan, dtype, scales_dtype, x_div)


def dense(plan: Plan, x: mx.array, w: mx.array, scales: mx.array, biases, poison=None) -> mx.array:
    """y (M, N) = x (M, K) @ dequant(w).T with the planned kernel (CUDA or
    Metal, by ``plan.backend``).

    ``poison`` (tests only) pre-fills the output, e.g. with NaN, to prove the
    kernel writes every element; the normal path leaves it uninitialized.
    """
    kernel, template, grid, threadgroup = _dense_launch(plan, x.dtype, scales.dtype)
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
    kernel, template = _gather_launch(plan, x.dtype, scales.dtype, x_div)
    return kernel(
        inputs=inputs,
        template=template,
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(P, plan.N)],
        output_dtypes=[x.dtype],
        init_value=poison,
    )[0]
