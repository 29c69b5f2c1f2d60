# Copyright © 2026 mtp_splitk contributors

"""The split-K kernels against MLX's ops, one weight shape at a time: what
``scripts/bench_kernels.py``, ``scripts/bench_moe.py``, ``scripts/bench_chain.py``
and ``mtp-splitk tune`` (:mod:`.tune`) share.

- inputs: quantized weights in enough distinct copies to stream past the L2
  (:func:`weight_sets`, :func:`packed_experts`, :func:`expert_sets`),
  routings drawn like a router's and mlx-lm's two ``gather_qmm`` call shapes
  (:func:`routings`, :func:`moe_call`, :func:`prepared_calls`);
- the calls, ours (a :class:`~mtp_splitk.plan.Plan`) or MLX's (``None``):
  :func:`dense_call`, :func:`gather_call`, :func:`gather_glu_call` (SwitchGLU's gate/up);
- timing (:mod:`.timing`): independent ops (:func:`time_dense`,
  :func:`time_gather`) and dependent chains (:func:`chain`);
- the tuning table's ranges from the measured rows (:func:`tuning_table`,
  :func:`moe_ranges`).
"""

import math
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from .. import launch
from .. import plan as planner
from .timing import median_call_us, median_time

L2_BYTES = 50 * 2**20  # the H100's; rotations cover 3x this (the H200 has 60 MB)
CHAIN_LENGTH = 64
CALLS = 16  # distinct routings per MoE timing batch


def dense_plan(backend, mode, bits, group_size, N, K, M, warps_k, depth=1, row_tiles=1):
    """The plan of one dense call of M rows, as the planner builds it for a
    split (row tiles only beside one or two token tiles)."""
    tiles = planner.token_tiles_for(M)
    return planner.Plan(backend, mode, bits, group_size, N, K, warps_k, tiles, depth,
                        row_tiles if tiles <= 2 else 1, planner.lean(backend, tiles))


def weight_sets(N, K, mode, bits, group_size, dtype=mx.bfloat16, l2_bytes=L2_BYTES):
    """Enough distinct quantized copies of an (N, K) weight to overflow L2 3x:
    ([(w, scales, biases or None)], bytes of one copy)."""
    mx.random.seed(N * 31 + K)
    w = (mx.random.normal((N, K)) * 0.02).astype(dtype)
    parts = mx.quantize(w, group_size, bits, mode=mode)
    parts = (parts[0], parts[1], parts[2] if mode == "affine" else None)
    one = sum(p.nbytes for p in parts if p is not None)
    count = max(2, min(256, math.ceil(3 * l2_bytes / one)))
    sets = [parts]
    for i in range(1, count):
        # Distinct buffers with the same statistics: cheap perturbed copies.
        sets.append(tuple(None if p is None else p + 0 if p.dtype != mx.uint32
                          else p ^ mx.array(i, mx.uint32) for p in parts))
    mx.eval(sets)
    return sets, one


def dense_call(plan, x, parts, mode, bits, group_size, poison=None):
    """``x @ dequant(w).T``: the kernel of ``plan``, or MLX's op for ``None``."""
    w, scales, biases = parts
    if plan is None:
        return mx.quantized_matmul(x, w, scales, biases, True, group_size, bits, mode)
    return launch.dense(plan, x, w, scales, biases, poison=poison)


def time_dense(sets, x, mode, bits, group_size, plan=None, **timer) -> float:
    """Seconds per op, independent ops over the rotated weights (MLX's for ``plan=None``)."""
    return median_time(
        lambda i: dense_call(plan, x, sets[i % len(sets)], mode, bits, group_size), **timer
    )


def chain_us(plan, x, sets, mode, bits, group_size, reps: int = 7) -> float:
    """µs a call of ``x`` through a dependent chain of dense calls over the
    rotated weights (ours for a plan, MLX's for ``None``)."""

    def op(y, parts):
        return dense_call(plan, y, parts, mode, bits, group_size)

    return median_call_us(lambda: mx.eval(chain(op, x, sets, fit=True)), reps=reps, warmup=2,
                          per=CHAIN_LENGTH)


def chain(
    op: Callable, x: mx.array, weights: List, length: int = CHAIN_LENGTH, fit: bool = False
) -> mx.array:
    """``x`` through ``length`` dependent calls ``op(x, weights[i % len])``
    (each output the next call's input, as in a model's forward). With
    ``fit``, an output wider or narrower than ``x`` is cut or zero-padded to
    ``x``'s width first (one op, the same for ours and MLX's), so one weight
    shape of any N x K can chain with itself."""
    K = x.shape[-1]
    for i in range(length):
        x = op(x, weights[i % len(weights)])
        if fit and x.shape[-1] > K:
            x = x[..., :K]
        elif fit and x.shape[-1] < K:
            x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, K - x.shape[-1])])
    return x


def packed_experts(E, N, K, bits=4, group_size=64, copies=1):
    """Random codes and bf16 scales/biases; ``copies`` distinct weight sets:
    ([(w, scales, biases)], bytes per expert)."""
    sets = []
    for _ in range(copies):
        # Random 32-bit words from two 16-bit halves (randint's range is int32).
        halves = [mx.random.randint(0, 1 << 16, (E, N, K * bits // 32)).astype(mx.uint32)
                  for _ in range(2)]
        w = (halves[0] << 16) | halves[1]
        s = (mx.random.uniform(0.002, 0.02, (E, N, K // group_size))).astype(mx.bfloat16)
        b = (-8 * s).astype(mx.bfloat16)
        mx.eval(w, s, b)
        sets.append((w, s, b))
    return sets, sum(a.nbytes for a in sets[0]) / E


def expert_sets(E, N, K, mode, bits, group_size, dtype=mx.bfloat16, l2_bytes=L2_BYTES):
    """Experts quantized from random weights in any mode, copied to pass the L2:
    ([(w, scales, biases or None)], bytes of one copy)."""
    w = (mx.random.normal((E, N, K)) * 0.05).astype(dtype)
    parts = mx.quantize(w, group_size, bits, mode=mode)
    parts = (parts[0], parts[1], parts[2] if mode == "affine" else None)
    one = sum(p.nbytes for p in parts if p is not None)
    count = max(1, min(3, math.ceil(3 * l2_bytes / one)))
    sets = [parts] + [
        tuple(None if p is None else p ^ mx.array(i, mx.uint32) if p.dtype == mx.uint32 else p + 0
              for p in parts)
        for i in range(1, count)
    ]
    mx.eval(sets)
    return sets, one


def routings(M, E, top_k, count, rng) -> List[np.ndarray]:
    """``count`` routings of M tokens, each to ``top_k`` distinct experts."""
    return [np.stack([rng.choice(E, top_k, replace=False) for _ in range(M)]).astype(np.uint32)
            for _ in range(count)]


def moe_call(x, idx: np.ndarray, top_k: int):
    """mlx-lm's call shape for a routing, (x, indices, sorted_indices), lazily:
    pre-sorted (x's rows gathered in expert order) for M * top_k >= 64,
    unsorted below."""
    M, K = x.shape
    if M * top_k < 64:
        return x.reshape(M, 1, 1, K), mx.array(idx), False
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    return x[mx.array(order // top_k)].reshape(-1, 1, K), mx.array(flat[order]), True


def prepared_calls(x, idxs, top_k):
    """:func:`moe_call` for each routing, evaluated."""
    calls = [moe_call(x, idx, top_k) for idx in idxs]
    mx.eval([c[:2] for c in calls])
    return calls


def gather_call(plan, call, parts, top_k, mode="affine", bits=4, group_size=64, poison=None):
    """One MoE call of ``prepared_calls``: the kernel of ``plan`` as (P, N), or
    ``mx.gather_qmm`` for ``None`` in mlx-lm's shape."""
    xs, idx, is_sorted = call
    w, s, b = parts
    if plan is None:
        return mx.gather_qmm(xs, w, s, b, rhs_indices=idx, transpose=True, group_size=group_size,
                             bits=bits, mode=mode, sorted_indices=is_sorted)
    K = xs.shape[-1]
    return launch.gather(plan, xs.reshape(-1, K), w, s, b, idx.reshape(-1),
                         1 if is_sorted else top_k, poison=poison)


def gather_glu_call(plan, call, gate, up, top_k, mode="affine", bits=4, group_size=64, poison=None):
    """SwitchGLU's ``swiglu(gate(x), up(x))`` over experts for one call: the fused
    grouped launch of ``plan`` as (P, N), or MLX's two ``gather_qmm`` and mlx-lm's
    swiglu for ``None``."""
    if plan is None:
        from mlx_lm.models.activations import swiglu

        return swiglu(gather_call(None, call, gate, top_k, mode, bits, group_size),
                      gather_call(None, call, up, top_k, mode, bits, group_size))
    xs, idx, is_sorted = call
    return launch.gather_glu(plan, xs.reshape(-1, xs.shape[-1]), gate, up, idx.reshape(-1),
                             1 if is_sorted else top_k, poison=poison)


def time_gather_glu(sets, calls, top_k, plan=None, mode="affine", bits=4, group_size=64,
                    **timer) -> float:
    """Seconds per SwitchGLU gate/up, independent calls over routings and weight
    copies (gate and up two different copies)."""
    return median_time(
        lambda i: gather_glu_call(plan, calls[i % len(calls)], sets[i % len(sets)], sets[(i + 1) % len(sets)],
                                  top_k, mode, bits, group_size),
        **timer,
    )


def time_gather(sets, calls, top_k, plan=None, mode="affine", bits=4, group_size=64,
                **timer) -> float:
    """Seconds per MoE op, independent ops over routings and weight copies."""
    return median_time(
        lambda i: gather_call(plan, calls[i % len(calls)], sets[i % len(sets)], top_k, mode, bits,
                              group_size),
        **timer,
    )


def gather_chain_us(plan, x, idx: np.ndarray, sets, top_k: int, mode="affine", bits=4, group_size=64,
                    reps: int = 7, glu: bool = False) -> float:
    """µs a call of ``x`` (M, K) through a dependent chain of MoE calls with the
    routing ``idx``, each link's (M, top_k * N) output fitted to K (ours for a
    plan, ``mx.gather_qmm`` for ``None``; x re-sorted each link as mlx-lm does).
    With ``glu``, each link is SwitchGLU's gate/up (:func:`gather_glu_call`, gate
    and up two different copies, as :func:`time_gather_glu`)."""
    M = x.shape[0]
    weights = [(s, sets[(i + 1) % len(sets)]) for i, s in enumerate(sets)] if glu else sets

    def op(y, parts):
        call = moe_call(y, idx, top_k)
        if glu:
            return gather_glu_call(plan, call, *parts, top_k, mode, bits, group_size).reshape(M, -1)
        return gather_call(plan, call, parts, top_k, mode, bits, group_size).reshape(M, -1)

    return median_call_us(lambda: mx.eval(chain(op, x, weights, fit=True)), reps=reps, warmup=2,
                          per=CHAIN_LENGTH)


def judgeable(row: Dict) -> bool:
    """Whether a measured row may admit its M: M = 1 only with a chain timing
    (plan.DECODE_MIN_SPEEDUP is a chain's margin; rows of independent ops
    alone, as bench_moe and the records before run 13 have, cannot admit it)."""
    return row["M"] != 1 or "chain_us_ours" in row


def tuning_table(rows, warps_k, depths, row_tiles, meta) -> Dict:
    """Per mode and shape, the M range where the kernel measured at least
    plan.required_speedup(M) times faster than MLX (the planner sends every other M
    to MLX), plus the split, prefetch depth and row tiles the sweep chose.
    ``rows``: dicts with mode, bits, N, K, M and speedup."""
    by_key = {}
    for r in filter(judgeable, rows):
        by_key.setdefault(f"{r['mode']}{r['bits']}:{r['N']}x{r['K']}", []).append(r)
    m_range = {key: planner.winning_range((r["M"], r["speedup"], r["M"]) for r in rs)
               for key, rs in by_key.items()}
    return dict(device=meta["device"], measured_with=meta["command"], mlx=meta["mlx"],
                min_speedup=planner.MIN_SPEEDUP, decode_min_speedup=planner.DECODE_MIN_SPEEDUP,
                warps_k=warps_k, depth=depths, row_tiles=row_tiles, m_range=m_range)


def moe_ranges(rows, mode_key: Optional[Callable[[Dict], str]] = None) -> Dict[str, list]:
    """Per expert shape, the pair counts where the kernel measured at least
    plan.required_speedup(M) times faster than MLX (the table's ``moe_p_range``).
    ``rows``: dicts with E, N, K, pairs, M and speedup (and mode, bits when
    ``mode_key`` is not given: the key's prefix, default affine4)."""
    mode_key = mode_key or (lambda r: f"{r.get('mode', 'affine')}{r.get('bits', 4)}")
    groups = {}
    for r in filter(judgeable, rows):
        groups.setdefault(f"{mode_key(r)}:{r['E'] * r['N']}x{r['K']}", []).append(r)
    return {key: list(planner.winning_range((r["pairs"], r["speedup"], r["M"]) for r in rs))
            for key, rs in sorted(groups.items())}
