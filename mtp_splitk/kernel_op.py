# Copyright © 2026 mtp_splitk contributors

"""The planned split-K kernels as MLX ops with MLX's derivatives.

A custom kernel has no vjp or jvp of its own, so ``mx.grad`` through it
would fail or, worse, see a constant. Each op built here runs the kernel
forward and differentiates as MLX's own op on the same arguments does
(``mx.custom_function``). It is built once per call signature (ops caches
it); what a kernel call pays for it is custom_function's per-call cost.
"""

import mlx.core as mx

from . import launch

# MLX's ops, bound at import: after `mx.quantized_matmul = mtp_splitk.quantized_matmul`
# (a global swap) the fallback and the derivatives must still reach MLX's op.
mlx_quantized_matmul = mx.quantized_matmul
mlx_gather_qmm = mx.gather_qmm


def _replace(values, positions, chosen):
    values = list(values)
    for i, value in zip(positions, chosen):
        values[i] = value
    return values


#: Whether kernel calls carry MLX's derivatives (mx.custom_function, a few µs
#: of host time a call). Off only to measure that cost: a gradient through a
#: kernel call then fails. Read when an op is built: ops.clear_cache() after
#: changing it.
DERIVATIVES = True


def with_derivatives_of(forward, reference, constant):
    """``forward`` (a kernel launch) as an op whose vjp and jvp are those of
    ``reference`` (MLX's ops on the same arguments; one output or a list).

    The arguments at the positions in ``constant`` (packed weights, indices,
    the scales of the fp modes), which MLX's op does not differentiate, get
    zero cotangents; a tangent for one makes MLX's op raise, as unpatched.
    ``forward`` stops gradients at x, so that ``mx.jvp`` reaches the jvp here
    without differentiating the kernel. (MLX's ops have no vmap, so neither
    have these: ``mx.vmap`` raises, as unpatched.)
    """
    if not DERIVATIVES:
        return forward
    op = mx.custom_function(forward)

    @op.vjp
    def vjp(primals, cotangents, outputs):
        free = [i for i in range(len(primals)) if i not in constant]
        _, grads = mx.vjp(
            lambda *args: reference(*_replace(primals, free, args)),
            [primals[i] for i in free],
            cotangents if isinstance(cotangents, (list, tuple)) else [cotangents],
        )
        zeros = [mx.zeros_like(p) if i in constant else None for i, p in enumerate(primals)]
        return tuple(_replace(zeros, free, grads))

    @op.jvp
    def jvp(primals, tangents):
        moving = [i for i, t in enumerate(tangents) if t is not None]
        _, out = mx.jvp(
            lambda *args: reference(*_replace(primals, moving, args)),
            [primals[i] for i in moving],
            [tangents[i] for i in moving],
        )
        return out[0] if len(out) == 1 else out

    return op


def dense(plan, M: int, K: int, out_shape: tuple, group_size: int, bits: int, mode: str):
    """``op(x, w, scales[, biases])``: x (..., K), M rows in all, times
    dequant(w).T, shaped ``out_shape``, by ``launch.dense``."""

    def forward(x, w, scales, biases=None):
        x = mx.stop_gradient(x).reshape(M, K)
        return launch.dense(plan, x, w, scales, biases).reshape(out_shape)

    def reference(x, w, scales, biases=None):
        return mlx_quantized_matmul(x, w, scales, biases, True, group_size, bits, mode)

    return with_derivatives_of(forward, reference, (1,) if mode == "affine" else (1, 2))


def gather(plan, x_div: int, out_shape: tuple, K: int, group_size: int, bits: int, mode: str,
           sorted_indices: bool, has_biases: bool):
    """``op(x, w, scales[, biases], rhs_indices)``: pair p multiplies x row
    p // x_div by expert rhs_indices[p], shaped ``out_shape``, by ``launch.gather``."""

    def forward(x, w, scales, *rest):
        *biases, idx = rest
        idx = idx.flatten()
        if idx.dtype != mx.uint32:
            idx = idx.astype(mx.uint32)
        x = mx.stop_gradient(x).reshape(-1, K)
        y = launch.gather(plan, x, w, scales, biases[0] if biases else None, idx, x_div)
        return y.reshape(out_shape)

    def reference(x, w, scales, *rest):
        *biases, idx = rest
        return mlx_gather_qmm(x, w, scales, biases[0] if biases else None, None, idx, True,
                              group_size, bits, mode, sorted_indices=sorted_indices)

    indices = 4 if has_biases else 3
    constant = (1, indices) if mode == "affine" else (1, 2, indices)
    return with_derivatives_of(forward, reference, constant)
