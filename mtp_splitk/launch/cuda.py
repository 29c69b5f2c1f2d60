# Copyright © 2026 mtp_splitk contributors

"""The CUDA kernel objects for a Plan, through mx.fast.cuda_kernel.

Each plan is its own kernel object whose body names the plan's constants and
whose header only #includes the kernel file: MLX folds a kernel's template
list and header text into every call's primitive, so both are kept small.
"""

import os
from functools import lru_cache

import mlx.core as mx

from ..plan import FusedPlan, Plan
from .common import (
    input_names,
    kernel_dir,
    kernel_name,
    multi_input_names,
    read_source,
    shared_memory,
    template,
)

# What mx.fast.cuda_kernel declares each dtype as in the kernel it generates.
_CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.uint8: "uint8_t"}


@lru_cache(maxsize=None)
def _cuda_header(file: str = "splitk_qmm.cu") -> str:
    """The kernel file for NVRTC, by absolute path when that can be spelled in
    an #include: MLX copies a kernel's header text into every call's
    primitive, and the measured per-op cost grew with it (scripts/
    bench_launch.py), so only the include line travels."""
    path = os.path.join(kernel_dir(), file).replace(os.sep, "/")
    if os.path.isabs(path) and not any(c in path for c in '"\\\n'):
        return f'#include "{path}"\n'
    return read_source(file)


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
    values.append("true" if plan.lean else "false")  # LEAN, a CUDA-only constant
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


def _fused_kernel(kind: str, plan: Plan, body: str, inputs, outputs, header: str, shared: int):
    return mx.fast.cuda_kernel(
        name=kernel_name(kind, plan.mode == "affine", read_source("splitk_qmm.cu"), header + body),
        input_names=inputs,
        output_names=outputs,
        source=body,
        header=header,
        shared_memory=shared,
    )


@lru_cache(maxsize=1024)
def multi_launch(plan: FusedPlan, dtype, scales_dtype):
    """The fused launch of 2 or 3 weights: (kernel, None, grid, threadgroup).
    Each weight's N is written into the body (a model has one q/k/v and one
    gate/up shape); a missing third weight repeats the second with N = 0."""
    lead, count = plan.members[0], len(plan.members)
    affine = lead.mode == "affine"
    slots = []
    for i in range(3):
        j = min(i, count - 1)
        biases = f"biases{j}" if affine else "(const uint8_t*)nullptr"
        slots.append(f"w{j}, scales{j}, {biases}, y{j}, {plan.members[i].N if i < count else 0}")
    body = (_cuda_call("splitk_qmm_multi", lead, dtype, scales_dtype)
            + f"(x, x_shape[0], x_shape[1], {', '.join(slots)});")
    kernel = _fused_kernel("multi", lead, body, multi_input_names(affine, count),
                           [f"y{i}" for i in range(count)], _cuda_header(), shared_memory(lead))
    threads = lead.warps_k * 32
    return kernel, None, (plan.blocks * threads, 1, 1), (threads, 1, 1)


# MLX's elementwise functors, as its compiled kernels use them (NVRTC resolves
# these names to MLX's own headers).
_MLX_OPS = ('#include "mlx/backend/cuda/device/unary_ops.cuh"\n'
            '#include "mlx/backend/cuda/device/binary_ops.cuh"\n')


def _swiglu(dtype) -> str:
    """mlx-lm's swiglu written with MLX's functors in the order of its graph:
    Multiply(Multiply(g, Sigmoid(g)), u), each step in the activation type,
    as MLX's compiled kernel computes it."""
    t = _CUDA_TYPES[dtype]
    return f"[]({t} g, {t} u) {{ return Multiply{{}}(Multiply{{}}(g, Sigmoid{{}}(g)), u); }}"


def _glu_biases(affine: bool):
    return ("biases0", "biases1") if affine else ("(const uint8_t*)nullptr",) * 2


@lru_cache(maxsize=1024)
def glu_launch(plan: FusedPlan, dtype, scales_dtype):
    """The gate/up launch with ``silu(gate) * up`` fused (:func:`_swiglu`):
    (kernel, grid, threadgroup)."""
    gate, up = plan.members
    affine = gate.mode == "affine"
    biases = _glu_biases(affine)
    body = (_cuda_call("splitk_qmm_glu", gate, dtype, scales_dtype)
            + f"(x, w0, scales0, {biases[0]}, w1, scales1, {biases[1]}, y, x_shape[0], {gate.N}, x_shape[1], "
            + f"{_swiglu(dtype)});")
    kernel = _fused_kernel("glu", gate, body, multi_input_names(affine, 2), ["y"], _MLX_OPS + _cuda_header(),
                           2 * shared_memory(gate))
    threads = 2 * gate.warps_k * 32
    return kernel, (gate.blocks * threads, 1, 1), (threads, 1, 1)


def _add(dtype) -> str:
    """MLX's Add functor, as its binary kernel and its compiled kernels apply it."""
    t = _CUDA_TYPES[dtype]
    return f"[]({t} a, {t} b) {{ return Add{{}}(a, b); }}"


@lru_cache(maxsize=4096)
def residual_launch(plan: Plan, dtype, scales_dtype):
    """The dense launch with the residual add after it (``r + y``, :func:`_add`):
    (kernel, grid, threadgroup); the dense kernel's grid."""
    affine = plan.mode == "affine"
    biases = "biases" if affine else "(const uint8_t*)nullptr"
    body = (_cuda_call("splitk_qmm_residual", plan, dtype, scales_dtype)
            + f"(x, w, scales, {biases}, r, y, x_shape[0], w_shape[0], x_shape[1], {_add(dtype)});")
    kernel = _fused_kernel("residual", plan, body, input_names(affine, False) + ["r"], ["y"],
                           _MLX_OPS + _cuda_header(), shared_memory(plan))
    threads = plan.warps_k * 32
    return kernel, (plan.blocks * threads, 1, 1), (threads, 1, 1)


@lru_cache(maxsize=1024)
def gather_glu_launch(plan: Plan, dtype, scales_dtype, x_div: int):
    """The grouped gate/up launch with the activation fused (SwitchGLU's):
    the kernel; the grid is the grouped kernel's with twice its warps."""
    affine = plan.mode == "affine"
    biases = _glu_biases(affine)
    body = (_cuda_call("splitk_gather_qmm_glu", plan, dtype, scales_dtype)
            + f"(x, w0, scales0, {biases[0]}, w1, scales1, {biases[1]}, idx, y, idx_shape[0], w0_shape[0], "
            + f"w0_shape[1], x_shape[1], {x_div}, {_swiglu(dtype)});")
    return _fused_kernel("gather_glu", plan, body, multi_input_names(affine, 2) + ["idx"], ["y"],
                         _MLX_OPS + _cuda_header(), 2 * shared_memory(plan))


GATED_DELTA_WARPS = 4  # value rows a block (kernels/gated_delta.cu)


@lru_cache(maxsize=64)
def gated_delta_launch(dtype, beta_dtype, dk: int, all_states: bool):
    """The Gated DeltaNet recurrence over a pass's rows (kernels/gated_delta.cu):
    the kernel object; one warp a value row, GATED_DELTA_WARPS a block."""
    body = (f"gated_delta_rows<{_CUDA_TYPES[dtype]}, {_CUDA_TYPES[beta_dtype]}, {dk}, {GATED_DELTA_WARPS}, "
            f"{'true' if all_states else 'false'}>(q, k, v, g, beta, state, y, states, q_shape[0], q_shape[1], "
            "q_shape[2], v_shape[2], v_shape[3]);")
    return mx.fast.cuda_kernel(
        name=kernel_name("gated_delta", False, read_source("gated_delta.cu"), body),
        input_names=["q", "k", "v", "g", "beta", "state"],
        output_names=["y", "states"],
        source=body,
        header=_cuda_header("gated_delta.cu"),
    )
