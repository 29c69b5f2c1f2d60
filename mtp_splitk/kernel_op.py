# Copyright © 2026 mtp_splitk contributors

"""The planned split-K kernels as MLX ops with MLX's derivatives.

A custom kernel has no vjp or jvp of its own, so ``mx.grad`` through it
fails. Where derivatives are wanted (a module in training mode, the drop-in
ops), the op built here runs the kernel forward and differentiates as MLX's
own op on the same arguments does (``mx.custom_function``). Inference (mlx-lm
loads models in eval mode) gets the bare kernel: the wrapper cost 6 ms of an
18 ms step of the overlapped loop on the H200. Ops are built once per call
signature (ops caches them).
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


def with_derivatives_of(forward, reference, constant, derivatives=True):
    """``forward`` (a kernel launch) as an op whose vjp and jvp are those of
    ``reference`` (MLX's ops on the same arguments; one output or a list);
    without ``derivatives``, ``forward`` itself (a gradient through it raises
    MLX's error for a custom kernel).

    The arguments at the positions in ``constant`` (packed weights, indices,
    the scales of the fp modes), which MLX's op does not differentiate, get
    zero cotangents; a tangent for one makes MLX's op raise, as unpatched.
    Gradients stop at x inside, so that ``mx.jvp`` reaches the jvp here
    without differentiating the kernel. (MLX's ops have no vmap, so neither
    have these: ``mx.vmap`` raises, as unpatched.)
    """
    if not derivatives:
        return forward
    op = mx.custom_function(lambda x, *rest: forward(mx.stop_gradient(x), *rest))

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


def dense(plan, M: int, K: int, out_shape: tuple, group_size: int, bits: int, mode: str,
          derivatives: bool = True):
    """``op(x, w, scales[, biases])``: x (..., K), M rows in all, times
    dequant(w).T, shaped ``out_shape``, by ``launch.dense``."""

    def forward(x, w, scales, biases=None):
        x = x.reshape(M, K)
        return launch.dense(plan, x, w, scales, biases).reshape(out_shape)

    def reference(x, w, scales, biases=None):
        return mlx_quantized_matmul(x, w, scales, biases, True, group_size, bits, mode)

    return with_derivatives_of(forward, reference, (1,) if mode == "affine" else (1, 2), derivatives)


def gather(plan, x_div: int, out_shape: tuple, K: int, group_size: int, bits: int, mode: str,
           sorted_indices: bool, has_biases: bool, derivatives: bool = True):
    """``op(x, w, scales[, biases], rhs_indices)``: pair p multiplies x row
    p // x_div by expert rhs_indices[p], shaped ``out_shape``, by ``launch.gather``."""

    def forward(x, w, scales, *rest):
        *biases, idx = rest
        idx = idx.flatten()
        if idx.dtype != mx.uint32:
            idx = idx.astype(mx.uint32)
        x = x.reshape(-1, K)
        y = launch.gather(plan, x, w, scales, biases[0] if biases else None, idx, x_div)
        return y.reshape(out_shape)

    def reference(x, w, scales, *rest):
        *biases, idx = rest
        return mlx_gather_qmm(x, w, scales, biases[0] if biases else None, None, idx, True,
                              group_size, bits, mode, sorted_indices=sorted_indices)

    indices = 4 if has_biases else 3
    constant = (1, indices) if mode == "affine" else (1, 2, indices)
    return with_derivatives_of(forward, reference, constant, derivatives)
