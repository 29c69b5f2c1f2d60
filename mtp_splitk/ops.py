# Copyright © 2026 mtp_splitk contributors

"""Drop-in replacements for ``mx.quantized_matmul`` and ``mx.gather_qmm``.

Each op validates its inputs (a ValueError that names the problem, never a
wrong number), asks the planner whether a split-K kernel is the right call,
and otherwise hands the call to MLX unchanged.
"""

from typing import Optional

import mlx.core as mx

from . import plan as planner

# (group sizes, bits) MLX accepts per mode, and its defaults (first entries).
MODES = {
    "affine": ((64, 32, 128), (4, 1, 2, 3, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "mxfp8": ((32,), (8,)),
    "nvfp4": ((16,), (4,)),
}
FLOAT_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


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


def check_quantized_weight(x, w, scales, biases, transpose, group_size, bits, mode):
    """Validate a quantized weight (any leading batch dims) against x.

    Returns (N, K): output features and reduction length.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}.")
    if w.dtype != mx.uint32:
        raise ValueError(f"w must hold packed uint32 words, got {w.dtype}.")
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 dimensions, got shape {w.shape}.")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension.")
    if mode == "affine":
        if biases is None:
            raise ValueError("Affine quantization needs biases.")
        if scales.dtype not in FLOAT_DTYPES:
            raise ValueError(f"Affine scales must be floating point, got {scales.dtype}.")
        if biases.shape != scales.shape:
            raise ValueError(
                f"biases shape {biases.shape} does not match scales shape {scales.shape}."
            )
    else:
        if biases is not None:
            raise ValueError(f"Mode {mode!r} takes no biases.")
        if scales.dtype != mx.uint8:
            raise ValueError(f"Mode {mode!r} needs uint8 scales, got {scales.dtype}.")
    rows, words = w.shape[-2:]
    packed = words * 32 // bits
    if transpose:
        N, K = rows, packed
    else:
        N, K = packed, rows
    expected_scales = (*w.shape[:-2], rows, packed // group_size)
    if (words * 32) % bits or packed % group_size or tuple(scales.shape) != expected_scales:
        raise ValueError(
            f"scales shape {scales.shape} does not fit w shape {w.shape} with "
            f"bits={bits}, group_size={group_size} (expected {expected_scales})."
        )
    if x.shape[-1] != K:
        raise ValueError(
            f"x has {x.shape[-1]} features but the quantized weight expects {K} "
            f"(w shape {w.shape}, bits={bits}, transpose={transpose})."
        )
    return N, K


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
) -> mx.array:
    """``mx.quantized_matmul`` with a split-K kernel for small M on the GPU."""
    group_size, bits = resolve_mode(mode, group_size, bits)
    N, K = check_quantized_weight(
        x, w, scales, biases, transpose, group_size, bits, mode
    )
    M = x.size // K if K else 0
    plan = None
    if transpose and w.ndim == 2 and stream is None:
        plan = planner.plan_dense(M, N, K, bits, group_size, mode, x.dtype)
    if plan is None:
        return mx.quantized_matmul(
            x, w, scales, biases, transpose, group_size, bits, mode, stream=stream
        )
    from . import launch

    y = launch.dense(plan, x.reshape(M, K), w, scales, biases)
    return y.reshape(*x.shape[:-1], N)


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
) -> mx.array:
    """``mx.gather_qmm``; the grouped MoE kernel plugs in here."""
    group_size, bits = resolve_mode(mode, group_size, bits)
    check_quantized_weight(x, w, scales, biases, transpose, group_size, bits, mode)
    if global_scale is not None and mode != "nvfp4":
        raise ValueError(f"global_scale is only used by mode 'nvfp4', not {mode!r}.")
    for name, idx in (("lhs_indices", lhs_indices), ("rhs_indices", rhs_indices)):
        if idx is not None and not mx.issubdtype(idx.dtype, mx.integer):
            raise ValueError(f"{name} must be integer, got {idx.dtype}.")
    if global_scale is None and lhs_indices is None and rhs_indices is not None and stream is None:
        y = _grouped(x, w, scales, biases, rhs_indices, transpose, group_size, bits, mode)
        if y is not None:
            return y
    kwargs = {} if global_scale is None else {"global_scale": global_scale}
    return mx.gather_qmm(
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


def _grouped(x, w, scales, biases, indices, transpose, group_size, bits, mode):
    """The grouped split-K kernel for mlx-lm's two switch-layer call shapes,
    or None to let MLX take the call:

    * unsorted: x (..., 1, 1, K) with indices (..., top_k): pair p reads x
      row p // top_k (SwitchGLU's expand_dims before gather_qmm);
    * sorted: x (P, 1, K) with indices (P,): pair p reads x row p.

    Output (..., top_k, 1, N) or (P, 1, N), in MLX's order. (nvfp4 with a
    global scale and explicit lhs_indices stay on MLX's path.)
    """
    if not transpose or w.ndim != 3 or x.ndim < 2 or x.shape[-2] != 1:
        return None
    batch = tuple(x.shape[:-2])
    ishape = tuple(indices.shape)
    if batch == ishape:
        x_div = 1
    elif len(ishape) >= 1 and batch == ishape[:-1] + (1,):
        x_div = ishape[-1]
    else:
        return None
    E, N = w.shape[0], w.shape[1]
    K = x.shape[-1]
    P = indices.size
    plan = planner.plan_gather(P, E, N, K, bits, group_size, mode, x.dtype)
    if plan is None:
        return None
    from . import launch

    idx = indices.flatten().astype(mx.uint32)
    y = launch.gather(plan, x.reshape(-1, K), w, scales, biases, idx, x_div)
    return y.reshape(*ishape, 1, N)
