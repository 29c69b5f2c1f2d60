# Copyright © 2026 mtp_splitk contributors

"""Drop-in replacements for ``mx.quantized_matmul`` and ``mx.gather_qmm``.

Each op validates its inputs (a ValueError that names the problem, never a
wrong number), asks the planner whether a split-K kernel is the right call,
and otherwise hands the call to MLX unchanged (MLX's ops as bound at import,
see ``kernel_op``). A call the kernel takes keeps MLX's derivatives
(``kernel_op``). :func:`recording` lists the calls and their plans.
"""

import contextlib
import math
import threading
from typing import Callable, NamedTuple, Optional

import mlx.core as mx

from . import kernel_op, plan as planner
from .kernel_op import mlx_gather_qmm as _mlx_gather_qmm
from .kernel_op import mlx_quantized_matmul as _mlx_quantized_matmul
from .plan import Plan

# (group sizes, bits) MLX accepts per mode, and its defaults (first entries).
MODES = {
    "affine": ((64, 32, 128), (4, 1, 2, 3, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "mxfp8": ((32,), (8,)),
    "nvfp4": ((16,), (4,)),
}
FLOAT_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


class Call(NamedTuple):
    """One op call seen by :func:`recording`: rows M of the result, its
    columns N, the reduction K, the kernel's Plan (None: MLX's op) and, for
    a dense call that took the kernel, the op it called
    (``kernel(x, w, scales[, biases])``: routing.py calls it directly)."""

    op: str  # "quantized_matmul" or "gather_qmm"
    M: int
    N: int
    K: int
    plan: Optional[Plan]
    kernel: Optional[Callable] = None


_recording = None  # the lists of the open recording() blocks, or None
_recording_lock = threading.Lock()


@contextlib.contextmanager
def recording():
    """``with recording() as calls:`` appends a :class:`Call` to ``calls``
    for every op call in the block (any thread; nested blocks each see all)."""
    global _recording
    calls = []
    with _recording_lock:
        _recording = (*(_recording or ()), calls)
    try:
        yield calls
    finally:
        with _recording_lock:
            _recording = tuple(c for c in _recording if c is not calls) or None


def record(call: Call) -> None:
    """Report a call made outside these ops (the fused projections) to the
    open :func:`recording` blocks."""
    for calls in _recording or ():
        calls.append(call)


def resolve_mode(mode: str, group_size: Optional[int], bits: Optional[int]):
    """Return (group_size, bits) with MLX's defaults filled in, or raise."""
    if mode not in MODES:
        raise ValueError(
            f"Unknown quantization mode {mode!r}; expected one of {', '.join(MODES)}."
        )
    groups, bit_widths = MODES[mode]
    group_size = group_size or groups[0]
    bits = bits or bit_widths[0]
    if group_size not in groups:
        raise ValueError(
            f"group_size={group_size} is not supported for mode {mode!r} "
            f"(supported: {', '.join(map(str, groups))})."
        )
    if bits not in bit_widths:
        raise ValueError(
            f"bits={bits} is not supported for mode {mode!r} "
            f"(supported: {', '.join(map(str, bit_widths))})."
        )
    return group_size, bits


def _signature(a: Optional[mx.array]):
    return None if a is None else (a.shape, a.dtype)


def _check(x, w, scales, biases, transpose, group_size, bits, mode):
    (x_shape, x_dtype), (w_shape, w_dtype), (s_shape, s_dtype) = x, w, scales
    if x_dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x_dtype}.")
    if w_dtype != mx.uint32:
        raise ValueError(f"w must hold packed uint32 words, got {w_dtype}.")
    if len(w_shape) < 2:
        raise ValueError(f"w must have at least 2 dimensions, got shape {w_shape}.")
    if len(x_shape) < 1:
        raise ValueError("x must have at least 1 dimension.")
    if mode == "affine":
        if biases is None:
            raise ValueError("Affine quantization needs biases.")
        if s_dtype not in FLOAT_DTYPES:
            raise ValueError(f"Affine scales must be floating point, got {s_dtype}.")
        if biases[0] != s_shape:
            raise ValueError(
                f"biases shape {biases[0]} does not match scales shape {s_shape}."
            )
    else:
        if biases is not None:
            raise ValueError(f"Mode {mode!r} takes no biases.")
        if s_dtype != mx.uint8:
            raise ValueError(f"Mode {mode!r} needs uint8 scales, got {s_dtype}.")
    rows, words = w_shape[-2:]
    packed = words * 32 // bits
    if transpose:
        N, K = rows, packed
    else:
        N, K = packed, rows
    expected_scales = (*w_shape[:-2], rows, packed // group_size)
    if (words * 32) % bits or packed % group_size or tuple(s_shape) != expected_scales:
        raise ValueError(
            f"scales shape {s_shape} does not fit w shape {w_shape} with "
            f"bits={bits}, group_size={group_size} (expected {expected_scales})."
        )
    if x_shape[-1] != K:
        raise ValueError(
            f"x has {x_shape[-1]} features but the quantized weight expects {K} "
            f"(w shape {w_shape}, bits={bits}, transpose={transpose})."
        )
    return N, K


def clear_cache() -> None:
    """Forget cached decisions (after changing what the planner reads, e.g.
    a tuning table, or to watch the planner being asked), the patched
    layers' too (they compare ``generation``)."""
    global generation
    _calls.clear()
    generation += 1


# A model makes the same few calls every step, so validation and planning are
# cached under one flat tuple of the call's shapes, dtypes and settings (nested
# keys hash slower). One device at a time (the planner's object, by identity);
# errors are not cached.
_calls = {}
_calls_device = [None]
_MAX_CALLS = 4096
generation = 0  # bumped by clear_cache: caches built on these decisions are stale


def _cached(key, device, miss):
    if device is not _calls_device[0] or len(_calls) >= _MAX_CALLS:
        _calls.clear()
        _calls_device[0] = device
    found = _calls.get(key)
    if found is None:
        found = _calls[key] = miss()
    return found


def _dense_call(x, w, scales, biases, transpose, group_size, bits, mode, split, device, derivatives):
    """(N, K, M, plan or None, kernel op or None) for a quantized_matmul
    signature. ``split`` (plan.forced_split(), which plan_dense reads itself)
    and ``device`` are in the key because the plan depends on them."""
    group_size, bits = resolve_mode(mode, group_size, bits)
    N, K = _check(x, w, scales, biases, transpose, group_size, bits, mode)
    M = math.prod(x[0]) // K if K else 0
    plan = None
    # The kernels read biases in the scales' type; MLX also takes mixed ones.
    if transpose and len(w[0]) == 2 and (biases is None or biases[1] == scales[1]):
        plan = planner.plan_dense(M, N, K, bits, group_size, mode, x[1], device)
    if plan is None:
        return N, K, M, None, None
    return N, K, M, plan, kernel_op.dense(plan, M, K, (*x[0][:-1], N), group_size, bits, mode, derivatives)


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    transpose: bool = True,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    *,
    stream=None,
    derivatives: bool = True,
) -> mx.array:
    """``mx.quantized_matmul`` with a split-K kernel for small M on the GPU;
    ``derivatives=False`` (a patched layer in eval mode) leaves out the wrapper
    that gives a kernel call MLX's derivatives, which costs time (kernel_op.py)."""
    device, split = planner.current_device(), planner.forced_split()
    key = ("dense", x.shape, x.dtype, w.shape, w.dtype, scales.shape, scales.dtype, _signature(biases),
           transpose, group_size, bits, mode, split, derivatives)
    N, K, M, plan, kernel = _cached(key, device, lambda: _dense_call(
        _signature(x), _signature(w), _signature(scales), _signature(biases),
        transpose, group_size, bits, mode, split, device, derivatives,
    ))
    if kernel is None or stream is not None:
        y = _mlx_quantized_matmul(
            x, w, scales, biases, transpose, group_size, bits, mode, stream=stream
        )
        plan = None
    else:
        y = kernel(x, w, scales) if biases is None else kernel(x, w, scales, biases)
    if _recording is not None:
        record(Call("quantized_matmul", M, N, K, plan, kernel if plan is not None else None))
    return y


def gather_qmm(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    lhs_indices: Optional[mx.array] = None,
    rhs_indices: Optional[mx.array] = None,
    transpose: bool = True,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    global_scale: Optional[mx.array] = None,
    *,
    sorted_indices: bool = False,
    stream=None,
    derivatives: bool = True,
) -> mx.array:
    """``mx.gather_qmm``; the grouped MoE kernel plugs in here (``derivatives``
    as for :func:`quantized_matmul`)."""
    device, split = planner.current_device(), planner.forced_split()
    key = ("gather", x.shape, x.dtype, w.shape, w.dtype, scales.shape, scales.dtype, _signature(biases),
           _signature(lhs_indices), _signature(rhs_indices), transpose, group_size, bits, mode,
           global_scale is not None, sorted_indices, split, derivatives)
    N, K, group_size, bits, plan, kernel = _cached(key, device, lambda: _gather_call(
        _signature(x), _signature(w), _signature(scales), _signature(biases),
        _signature(lhs_indices), _signature(rhs_indices), transpose, group_size, bits, mode,
        global_scale is not None, sorted_indices, split, device, derivatives,
    ))
    if kernel is not None and stream is None:
        arrays = (x, w, scales, rhs_indices) if biases is None else (x, w, scales, biases, rhs_indices)
        y = kernel(*arrays)
    else:
        kwargs = {} if global_scale is None else {"global_scale": global_scale}
        y = _mlx_gather_qmm(
            x,
            w,
            scales,
            biases,
            lhs_indices,
            rhs_indices,
            transpose,
            group_size,
            bits,
            mode,
            sorted_indices=sorted_indices,
            stream=stream,
            **kwargs,
        )
        plan = None
    if _recording is not None:
        record(Call("gather_qmm", y.size // N if N else 0, N, K, plan))
    return y


def _gather_call(x, w, scales, biases, lhs, rhs, transpose, group_size, bits, mode, has_global_scale,
                 sorted_indices, split, device, derivatives):
    """(N, K, group_size, bits, plan or None, kernel op or None) for a
    gather_qmm signature; ``split`` and ``device`` as for _dense_call."""
    group_size, bits = resolve_mode(mode, group_size, bits)
    N, K = _check(x, w, scales, biases, transpose, group_size, bits, mode)
    if has_global_scale and mode != "nvfp4":
        raise ValueError(f"global_scale is only used by mode 'nvfp4', not {mode!r}.")
    for name, idx in (("lhs_indices", lhs), ("rhs_indices", rhs)):
        if idx is not None and not mx.issubdtype(idx[1], mx.integer):
            raise ValueError(f"{name} must be integer, got {idx[1]}.")
    grouped = None
    if not has_global_scale and lhs is None and rhs is not None and (biases is None or biases[1] == scales[1]):
        grouped = grouped_plan(x, w, rhs[0], transpose, group_size, bits, mode, device)
    if grouped is None:
        return N, K, group_size, bits, None, None
    plan, x_div, out_shape = grouped
    op = kernel_op.gather(
        plan, x_div, out_shape, K, group_size, bits, mode, sorted_indices, biases is not None,
        derivatives,
    )
    return N, K, group_size, bits, plan, op


def grouped_plan(x, w, ishape, transpose, group_size, bits, mode, device, ranges="moe_p_range"):
    """The grouped split-K kernel's (plan, x_div, output shape) for mlx-lm's
    two switch-layer call shapes, or None to let MLX take the call (``ranges``:
    the table's entry that says for which pair counts, as ``plan.plan_gather``):

    * unsorted: x (..., 1, 1, K) with indices (..., top_k): pair p reads x
      row p // top_k (SwitchGLU's expand_dims before gather_qmm);
    * sorted: x (P, 1, K) with indices (P,): pair p reads x row p.

    Output (..., top_k, 1, N) or (P, 1, N), in MLX's order. (nvfp4 with a
    global scale and explicit lhs_indices stay on MLX's path.)
    """
    (x_shape, x_dtype), (w_shape, _) = x, w
    if not transpose or len(w_shape) != 3 or len(x_shape) < 2 or x_shape[-2] != 1:
        return None
    batch = tuple(x_shape[:-2])
    ishape = tuple(ishape)
    if batch == ishape:
        x_div = 1
    elif len(ishape) >= 1 and batch == ishape[:-1] + (1,):
        x_div = ishape[-1]
    else:
        return None
    E, N = w_shape[0], w_shape[1]
    K = x_shape[-1]
    P = math.prod(ishape)
    plan = planner.plan_gather(P, E, N, K, bits, group_size, mode, x_dtype, device, ranges)
    if plan is None:
        return None
    return plan, x_div, (*ishape, 1, N)
