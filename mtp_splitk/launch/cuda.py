# Copyright © 2026 mtp_splitk contributors

"""The CUDA kernel objects for a Plan, through mx.fast.cuda_kernel.

Each plan is its own kernel object whose body names the plan's constants and
whose header only #includes the kernel file: MLX folds a kernel's template
list and header text into every call's primitive, so both are kept small.
"""

import os
from functools import lru_cache

import mlx.core as mx

from ..plan import Plan
from .common import input_names, kernel_dir, kernel_name, read_source, shared_memory, template

# What mx.fast.cuda_kernel declares each dtype as in the kernel it generates.
_CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.uint8: "uint8_t"}


@lru_cache(maxsize=None)
def _cuda_header() -> str:
    """The kernel file for NVRTC, by absolute path when that can be spelled in
    an #include: MLX copies a kernel's header text into every call's
    primitive, and the measured per-op cost grew with it (scripts/
    bench_launch.py), so only the include line travels."""
    path = os.path.join(kernel_dir(), "splitk_qmm.cu").replace(os.sep, "/")
    if os.path.isabs(path) and not any(c in path for c in '"\\\n'):
        return f'#include "{path}"\n'
    return read_source("splitk_qmm.cu")


def _cuda_call(function: str, plan: Plan, dtype, scales_dtype) -> str:
    """The body: one call of the kernel's function with the plan's constants
    written in. MLX's template arguments cost time on every call (bench_launch)."""
    values = []
    for name, v in template(plan, dtype, scales_dtype):
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
        shared_memory=shared_memory(plan),  # fixed per kernel object by MLX
    )


@lru_cache(maxsize=4096)
def dense_launch(plan: Plan, dtype, scales_dtype):
    """Everything about a dense launch except the arrays, built once per plan."""
    affine = plan.mode == "affine"
    biases = "biases" if affine else "(const uint8_t*)nullptr"
    body = (_cuda_call("splitk_qmm", plan, dtype, scales_dtype)
            + f"(x, w, scales, {biases}, y, x_shape[0], w_shape[0], x_shape[1]);")
    threads = plan.warps_k * 32
    return (_cuda_kernel("qmm", plan, body), None, (plan.blocks * threads, 1, 1), (threads, 1, 1))


@lru_cache(maxsize=4096)
def gather_launch(plan: Plan, dtype, scales_dtype, x_div: int):
    """The grouped kernel and its template (None) for a plan."""
    affine = plan.mode == "affine"
    biases = "biases" if affine else "(const uint8_t*)nullptr"
    body = (_cuda_call("splitk_gather_qmm", plan, dtype, scales_dtype)
            + f"(x, w, scales, {biases}, idx, y, idx_shape[0], w_shape[0], w_shape[1], x_shape[1], {x_div});")
    return _cuda_kernel("gather", plan, body), None
