# Copyright © 2026 mtp_splitk contributors

"""Build the split-K kernels from kernels/ and launch them for a Plan.

The sources are read once; MLX compiles one variant per plan (mode, split,
token tiles, dtypes) on first use and caches it. ``cuda`` and ``metal`` build
the kernel objects; :func:`dense`, :func:`gather` and the fused
:func:`dense_multi` / :func:`dense_glu` / :func:`dense_residual` / :func:`gather_glu`
make the calls.
"""

import mlx.core as mx

from ..plan import FusedPlan, Plan
from . import cuda, metal
from .common import input_names, kernel_name, read_source


def _backend(plan: Plan):
    return cuda if plan.backend == "cuda" else metal


def _one_output(kernel, inputs, grid, threadgroup, shape, dtype, poison, template=None) -> mx.array:
    """One launch of ``kernel`` with one output; ``poison`` (tests only) pre-fills
    it, e.g. with NaN, to prove the kernel writes every element."""
    return kernel(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                  output_shapes=[shape], output_dtypes=[dtype], init_value=poison)[0]


def dense(plan: Plan, x: mx.array, w: mx.array, scales: mx.array, biases, poison=None) -> mx.array:
    """y (M, N) = x (M, K) @ dequant(w).T with the planned kernel (CUDA or
    Metal, by ``plan.backend``).

    ``poison`` (tests only) pre-fills the output, e.g. with NaN, to prove the
    kernel writes every element; the normal path leaves it uninitialized.
    """
    kernel, template, grid, threadgroup = _backend(plan).dense_launch(plan, x.dtype, scales.dtype)
    inputs = [x, w, scales, biases] if biases is not None else [x, w, scales]
    # template: None on CUDA (the constants are in the body)
    return _one_output(kernel, inputs, grid, threadgroup, (x.shape[0], plan.N), x.dtype, poison, template)


def dense_residual(plan: Plan, x, w, scales, biases, residual, poison=None) -> mx.array:
    """``residual + dense(plan, x, w, scales, biases)`` (M, N) in one launch (CUDA
    only), bit for bit :func:`dense` then MLX's add."""
    if plan.backend != "cuda":
        raise ValueError(f"the fused residual add has no {plan.backend} kernel")
    kernel, grid, threadgroup = cuda.residual_launch(plan, x.dtype, scales.dtype)
    inputs = [x, w, scales, biases, residual] if biases is not None else [x, w, scales, residual]
    return _one_output(kernel, inputs, grid, threadgroup, (x.shape[0], plan.N), x.dtype, poison)


def gather(plan: Plan, x, w, scales, biases, idx, x_div: int, poison=None) -> mx.array:
    """y (P, N): pair p multiplies x row p // x_div by expert idx[p]."""
    P = idx.size
    threads = plan.warps_k * 32
    # Blocks for up to min(E, P) active experts times the row tiles of one
    # (grids count threads on both backends).
    blocks = min(w.shape[0], P) * plan.blocks
    inputs = [x, w, scales, biases, idx] if biases is not None else [x, w, scales, idx]
    kernel, template = _backend(plan).gather_launch(plan, x.dtype, scales.dtype, x_div)
    return _one_output(kernel, inputs, (blocks * threads, 1, 1), (threads, 1, 1), (P, plan.N), x.dtype, poison,
                       template)


def _weight_inputs(weights):
    inputs = []
    for w, scales, biases in weights:
        inputs += [w, scales] if biases is None else [w, scales, biases]
    return inputs


def dense_multi(plan: FusedPlan, x: mx.array, weights, poison=None) -> list:
    """[y_i (M, N_i) = x (M, K) @ dequant(w_i).T for each ``(w, scales, biases)``
    in ``weights``] in one launch (CUDA or Metal, by the plan's backend); each
    y_i is bit for bit ``dense(plan.members[i], x, *weights[i])``."""
    lead = plan.members[0]
    kernel, template, grid, threadgroup = _backend(lead).multi_launch(plan, x.dtype, weights[0][1].dtype)
    return kernel(
        inputs=[x] + _weight_inputs(weights),
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(x.shape[0], p.N) for p in plan.members],
        output_dtypes=[x.dtype] * len(plan.members),
        init_value=poison,
    )


def dense_glu(plan: FusedPlan, x: mx.array, gate, up, poison=None) -> mx.array:
    """``silu(g) * u`` (M, N) for g, u = x @ dequant(w).T of the ``(w, scales,
    biases)`` triples ``gate`` and ``up``, in one launch (CUDA only), rounded as
    mlx-lm's swiglu rounds g and u from :func:`dense`."""
    lead = plan.members[0]
    if lead.backend != "cuda":
        raise ValueError(f"the fused activation has no {lead.backend} kernel")
    kernel, grid, threadgroup = cuda.glu_launch(plan, x.dtype, gate[1].dtype)
    return _one_output(kernel, [x] + _weight_inputs([gate, up]), grid, threadgroup, (x.shape[0], lead.N), x.dtype,
                       poison)


def gather_glu(plan: Plan, x, gate, up, idx, x_div: int, poison=None) -> mx.array:
    """``silu(g) * u`` (P, N) for pair p's g, u = x row p // x_div @ dequant(expert
    idx[p]).T of the stacked ``(w, scales, biases)`` triples ``gate`` and ``up``,
    in one launch (CUDA only), rounded as :func:`gather`'s outputs then mlx-lm's
    swiglu round them."""
    if plan.backend != "cuda":
        raise ValueError(f"the fused activation has no {plan.backend} kernel")
    P = idx.size
    threads = 2 * plan.warps_k * 32
    blocks = min(gate[0].shape[0], P) * plan.blocks  # as gather()'s
    kernel = cuda.gather_glu_launch(plan, x.dtype, gate[1].dtype, x_div)
    return _one_output(kernel, [x] + _weight_inputs([gate, up]) + [idx], (blocks * threads, 1, 1), (threads, 1, 1),
                       (P, plan.N), x.dtype, poison)


def gated_delta(q, k, v, g, beta, state, all_states: bool, poison=None):
    """The Gated DeltaNet recurrence over q's T rows (CUDA only; shapes as
    mlx-lm's gated_delta_ops takes them, g scalar a head): y [B, T, Hv, Dv] and the
    state after every row [T, B, Hv, Dv, Dk] (``all_states``) or after the last [1, ...]."""
    B, T, _, dk = q.shape
    Hv, Dv = v.shape[-2:]
    kernel = cuda.gated_delta_launch(q.dtype, beta.dtype, dk, all_states)
    rows = B * Hv * Dv
    threads = cuda.GATED_DELTA_WARPS * 32
    blocks = -(-rows // cuda.GATED_DELTA_WARPS)
    return kernel(inputs=[q, k, v, g, beta, state], grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1),
                  output_shapes=[(B, T, Hv, Dv), (T if all_states else 1, B, Hv, Dv, dk)],
                  output_dtypes=[q.dtype, mx.float32], init_value=poison)
