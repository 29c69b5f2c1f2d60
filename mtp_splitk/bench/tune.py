# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk tune``: the split-K kernels checked and timed on this GPU, and
the tuning table the planner reads before the shipped ones.

For every kernel variant a model's shapes need (:func:`model_variants`: each
quantized matmul's weight shape, quantization mode and dtype, dense or MoE;
without a model, the shapes of the shipped tables, :func:`default_variants`):

1. the split: the shipped table's for the shape, else the planner's rule
   (``--quick``), or the best worst case over M of a sweep in dependent chains
   (:func:`choose_split`, :func:`sweep_split`);
2. the check (:func:`check`): fresh random inputs, the output NaN-poisoned
   before the kernel runs, against MLX's own op, for every token-tile
   variant (M = 1 .. 64); a variant that fails is recorded as failed and is
   never planned (``plan.failed``);
3. the timing (:func:`measure`): independent ops over weights rotated past
   the L2, and chains of dependent calls, ours against MLX's at each M; the
   speedup the table keeps is the chain's at M = 1 and the lower of the two
   elsewhere (:func:`judged_speedup`);
4. the table (:func:`build_table`): the shipped table's format (split,
   depth, row tiles, ``m_range``, ``moe_warps_k``, ``moe_depth``,
   ``moe_p_range``, ``moe_glu_p_range``) plus ``failed``, merged into the
   user's table for the device, written after every variant to
   ``plan.user_tuning_path`` (``<cache>/tuning/<device>.json``).

A MoE variant that is a SwitchGLU gate/up pair (``Variant.glu``) also has its
fused gate/up + swiglu launch (``plan.plan_gather_glu``) checked and timed
against MLX's three ops, at the grouped kernel's split, on CUDA
(:func:`tune_glu`): its failure is failed's "moe_glu" kind, its pair range
``moe_glu_p_range``.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import plan as planner
from . import kernels
from .harness import Deadline, Progress

# 7 (a k = 6 verify) is MLX's per-row kernel at its dearest and the last M of our first token tile.
QUICK_MS, FULL_MS = (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)
QUICK_MOE_MS, FULL_MOE_MS = (1, 2, 4, 8), (1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 32)
CHECK_MS = (1, 3, 8, 13, 29, 64)  # every token-tile variant (1, 2, 4, 8 tiles), odd sizes
CHECK_MOE_MS = (1, 3, 8, 13)  # unsorted and pre-sorted calls
TOL = {"bfloat16": 1e-2, "float16": 5e-3}  # relative to MLX's own op (which rounds too)
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class Variant:
    """One weight shape in one quantization mode and dtype, dense or MoE."""

    op: str  # "dense" or "moe"
    mode: str
    bits: int
    group_size: int
    N: int
    K: int
    E: int = 0  # experts (MoE)
    top_k: int = 0  # experts per token (MoE)
    dtype: str = "bfloat16"
    glu: bool = False  # MoE: a SwitchGLU gate/up pair, so the fused launch is tuned too

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.K}" if self.op == "dense" else f"{self.E}x{self.N}x{self.K}"

    @property
    def failed_key(self) -> str:  # plan.failed's key
        return f"{self.op}:{self.mode}:b{self.bits}:g{self.group_size}:{self.shape}"

    @property
    def glu_failed_key(self) -> str:  # plan.failed's key of the fused gate/up launch
        return f"moe_glu:{self.mode}:b{self.bits}:g{self.group_size}:{self.shape}"

    @property
    def range_key(self) -> str:  # the m_range / moe_p_range key
        rows = self.N if self.op == "dense" else self.E * self.N
        return f"{self.mode}{self.bits}:{rows}x{self.K}"

    def __str__(self):
        glu = " (SwitchGLU gate/up)" if self.glu else ""
        return f"{self.op} {self.mode} {self.bits}-bit g{self.group_size} {self.shape} {self.dtype}{glu}"


# -- which variants ----------------------------------------------------------------------------


def model_variants(model: nn.Module) -> List[Variant]:
    """The distinct quantized matmuls of a loaded mlx-lm model (lazy is fine)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    floats = [v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    dtype = next((str(d).split(".")[-1] for d in floats if d in (mx.bfloat16, mx.float16)), None)
    dtype = dtype or "bfloat16"
    args = getattr(model, "args", None)
    top_k = int(getattr(args, "num_experts_per_tok", 0) or getattr(args, "experts_per_token", 8))
    names = {name for name, _ in model.named_modules()}
    tied = not any(n.endswith("lm_head") for n in names)
    glu = glu_pairs(model)
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear) or (tied and isinstance(m, nn.QuantizedEmbedding)):
            N, K = m.weight.shape[0], m.weight.shape[-1] * 32 // m.bits
            found.append(Variant("dense", m.mode, m.bits, m.group_size, N, K, dtype=dtype))
        elif isinstance(m, QuantizedSwitchLinear):
            key = _experts(m)
            mode, bits, group_size, E, N, K = key
            found.append(Variant("moe", mode, bits, group_size, N, K, E, top_k, dtype, key in glu))
    return sorted(set(found), key=str)


def _experts(layer) -> Tuple:
    """(mode, bits, group size, E, N, K) of a QuantizedSwitchLinear."""
    E, N, words = layer.weight.shape
    return layer.mode, layer.bits, layer.group_size, E, N, words * 32 // layer.bits


def glu_pairs(model: nn.Module) -> set:
    """:func:`_experts` of each SwitchGLU gate/up pair the fused launch can take
    (``fused.fusable_switch_glu``)."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from ..fused import fusable_switch_glu

    return {_experts(m.gate_proj) for _, m in model.named_modules()
            if isinstance(m, SwitchGLU) and fusable_switch_glu(m.gate_proj, m.up_proj, type(m.activation))}


def default_variants() -> List[Variant]:
    """Without a model: the shapes the shipped tables hold (scripts/bench_kernels.py's
    and scripts/bench_moe.py's), 4-bit affine, group 64, bfloat16; Qwen3's experts'
    gate/up a SwitchGLU pair (gpt-oss's activation is not mlx-lm's SwiGLU)."""
    dense = [(4096, 4096), (14336, 4096), (4096, 14336), (2560, 2560), (2048, 768),
             (151936, 2048)]
    moe = [(128, 768, 2048, 8, True), (128, 2048, 768, 8, False), (32, 2880, 2880, 4, False)]
    return [Variant("dense", "affine", 4, 64, N, K) for N, K in dense] + [
        Variant("moe", "affine", 4, 64, N, K, E, top_k, glu=glu) for E, N, K, top_k, glu in moe
    ]


def runnable(variant: Variant) -> bool:
    """What the kernels implement (the rest is never planned, so not tuned)."""
    return planner.supported(variant.mode, variant.bits, variant.group_size, variant.K,
                             DTYPES.get(variant.dtype))


# -- one variant: split, check, timing ---------------------------------------------------------


def _plan(variant: Variant, device, M: int, split: Tuple[int, int, int]):
    warps, depth, row_tiles = split
    v = variant
    if v.op == "dense":
        return kernels.dense_plan(device.backend, v.mode, v.bits, v.group_size, v.N, v.K, M,
                                  warps, depth, row_tiles)
    return planner.Plan(device.backend, v.mode, v.bits, v.group_size, v.N, v.K, warps, 1, depth,
                        lean=planner.lean(device.backend, 1))


def _weights(variant: Variant, copies_for_l2: bool):
    v, dtype = variant, DTYPES[variant.dtype]
    l2 = kernels.L2_BYTES if copies_for_l2 else 0
    if v.op == "dense":
        return kernels.weight_sets(v.N, v.K, v.mode, v.bits, v.group_size, dtype, l2)[0]
    return kernels.expert_sets(v.E, v.N, v.K, v.mode, v.bits, v.group_size, dtype, l2)[0]


def _moe_calls(variant: Variant, M: int, count: int):
    rng = np.random.default_rng()
    x = mx.random.normal((M, variant.K)).astype(DTYPES[variant.dtype])
    return kernels.prepared_calls(x, kernels.routings(M, variant.E, variant.top_k, count, rng),
                                  variant.top_k)


def choose_split(variant: Variant, device, table: Dict, quick: bool) -> Tuple[int, int, int]:
    """(warps along K, depth, row tiles). MoE: the table's or the planner's rule. Dense:
    the table's for the shape or the planner's rule (quick), else
    :func:`sweep_split`."""
    v = variant
    if v.op == "moe":
        warps, depth = planner.moe_split(table, v.E, v.N, v.K, device.sm_count)
        return int(warps), int(depth), 1
    shape = f"{v.N}x{v.K}"
    if quick or shape in table.get("warps_k", {}):
        warps = table.get("warps_k", {}).get(shape)
        warps = warps or planner.choose_warps_k(v.N, v.K, device.sm_count)
        depth = table.get("depth", {}).get(shape, 1)
        return int(warps), int(depth), int(table.get("row_tiles", {}).get(shape, 1))
    return sweep_split(v, device)


SPLIT_DEPTHS = (1, 2, 3)  # K chunks in flight per warp the sweep tries
SPLIT_MS = (1, 8)  # decode and the widest one-tile verify: what a split is judged at


def sweep_split(variant: Variant, device, log=None) -> Tuple[int, int, int]:
    """The dense split with the lowest worst time over :data:`SPLIT_MS` in a
    dependent chain (batch invariance: one split for every M)."""
    scores = sweep_scores(variant, device, log)
    return min(scores, key=scores.get)


def sweep_scores(variant: Variant, device, log=None) -> Dict[Tuple[int, int, int], float]:
    """{(warps along K, depth, row tiles): worst µs a call over :data:`SPLIT_MS`}
    in dependent chains. Chains, since a forward is one: independent ops may
    overlap on the GPU and rank grids that leave SMs idle first
    (benchmarks/h200/RUNS.md, run 13b)."""
    v = variant
    sets = _weights(v, copies_for_l2=True)
    chunks = -(-v.K // planner.K_PER_CHUNK)
    xs = {M: mx.random.normal((M, v.K)).astype(DTYPES[v.dtype]) for M in SPLIT_MS}
    worst = {}
    for warps in (w for w in planner.WARP_CHOICES if w <= chunks):
        for depth in SPLIT_DEPTHS:
            for row_tiles in (1, 2):
                split = (warps, depth, row_tiles)
                worst[split] = max(
                    kernels.chain_us(_plan(v, device, M, split), x, sets, v.mode, v.bits, v.group_size)
                    for M, x in xs.items()
                )
    if log is not None:
        log(f"  split,depth,rows {v.N}x{v.K} (chain µs a call, worst of M = {SPLIT_MS}): "
            + ", ".join(f"{k}:{t:.1f}" for k, t in worst.items()))
    return worst


# A fused launch (q/k/v) needs its weights at one split; one shared costs the
# members at most this much more, apart, than their own best splits.
SHARED_SPLIT_TOLERANCE = 1.1


def shared_splits(scores: Dict[str, Dict], calls: Dict[str, int]):
    """For shapes one fused launch takes together (``calls``: shape -> calls a
    layer, e.g. q/o's 2 and k/v's 2), {shape: split} at one warps-along-K
    value, each shape with its best depth and row tiles there; None where
    the best shared value costs the calls more than SHARED_SPLIT_TOLERANCE
    times their own best splits. ``scores``: shape -> :func:`sweep_scores`."""

    def cost(shape, warps):
        return min(t for (w, _, _), t in scores[shape].items() if w == warps)

    common = set.intersection(*({w for w, _, _ in scores[shape]} for shape in calls))
    if not common:
        return None
    total = {w: sum(n * cost(shape, w) for shape, n in calls.items()) for w in common}
    warps = min(total, key=total.get)
    apart = sum(n * min(scores[shape].values()) for shape, n in calls.items())
    if total[warps] > SHARED_SPLIT_TOLERANCE * apart:
        return None
    return {shape: min((k for k in scores[shape] if k[0] == warps), key=scores[shape].get) for shape in calls}


def judged_speedup(M: int, independent: float, chain: float) -> float:
    """The speedup a row's M is judged by: at M = 1 the dependent chain's
    (decode is one; independent ops flatter ours there), else the lower of
    the two."""
    return chain if M == 1 else min(independent, chain)


def check(variant: Variant, device, split, glu: bool = False) -> Optional[str]:
    """None if the kernel matches MLX's op at every checked M, else why not. With
    ``glu``, SwitchGLU's fused gate/up launch against ``swiglu`` of MLX's two
    ``gather_qmm``."""
    v = variant
    tol = TOL[v.dtype]
    try:
        parts = _weights(v, copies_for_l2=False)[0]
        up = _weights(v, copies_for_l2=False)[0] if glu else None  # a second draw: a gate/up mix-up shows
        for M in CHECK_MS if v.op == "dense" else CHECK_MOE_MS:
            ours, ref = _outputs(v, _plan(v, device, M, split), M, parts, up)
            ours = np.array(ours.astype(mx.float32)).reshape(-1)
            ref = np.array(ref.astype(mx.float32)).reshape(-1)
            if np.isnan(ours).any():
                return f"M={M}: outputs left unwritten (NaN poison) or NaN"
            err = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))
            if not err < tol:
                return f"M={M}: relative error {err:.3g} against MLX's op (limit {tol:g})"
    except Exception as e:  # a kernel that does not build or launch here fails the check
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


def _outputs(variant: Variant, plan, M: int, parts, up=None):
    """(ours, the output NaN-poisoned first; MLX's) for one call of M tokens with
    fresh inputs; with ``up``, SwitchGLU's gate (``parts``) and up fused."""
    v, args = variant, (variant.mode, variant.bits, variant.group_size)
    if v.op == "dense":
        x = mx.random.normal((M, v.K)).astype(DTYPES[v.dtype])
        return kernels.dense_call(plan, x, parts, *args, math.nan), kernels.dense_call(None, x, parts, *args)
    call = _moe_calls(v, M, 1)[0]
    if up is not None:
        return (kernels.gather_glu_call(plan, call, parts, up, v.top_k, *args, math.nan),
                kernels.gather_glu_call(None, call, parts, up, v.top_k, *args))
    return (kernels.gather_call(plan, call, parts, v.top_k, *args, math.nan),
            kernels.gather_call(None, call, parts, v.top_k, *args))


def measure(variant: Variant, device, split, quick: bool, glu: bool = False) -> List[Dict]:
    """Per M: µs per op of MLX and ours, independent and in a dependent chain,
    and ``speedup``, the lower of the two ratios. With ``glu``, SwitchGLU's fused
    gate/up launch against MLX's two ``gather_qmm`` and swiglu."""
    v = variant
    timer = dict(reps=7, batch=16, warmup=2) if quick else {}
    reps = 7 if quick else 15
    sets = _weights(v, copies_for_l2=True)
    rows = []
    for M in (QUICK_MS if quick else FULL_MS) if v.op == "dense" else (
        QUICK_MOE_MS if quick else FULL_MOE_MS
    ):
        plan = _plan(v, device, M, split)
        pair = (("mlx", None), ("ours", plan))
        x = mx.random.normal((M, v.K)).astype(DTYPES[v.dtype])
        mx.eval(x)
        if v.op == "dense":
            t = {k: kernels.time_dense(sets, x, v.mode, v.bits, v.group_size, p, **timer) for k, p in pair}
            c = {k: kernels.chain_us(p, x, sets, v.mode, v.bits, v.group_size, reps) for k, p in pair}
        else:
            calls = _moe_calls(v, M, kernels.CALLS)
            timed = kernels.time_gather_glu if glu else kernels.time_gather
            t = {k: timed(sets, calls, v.top_k, p, v.mode, v.bits, v.group_size, **timer) for k, p in pair}
            idx = kernels.routings(M, v.E, v.top_k, 1, np.random.default_rng())[0]  # the chain's, both sides
            c = {k: kernels.gather_chain_us(p, x, idx, sets, v.top_k, v.mode, v.bits, v.group_size, reps, glu)
                 for k, p in pair}
        row = dict(op=v.op, mode=v.mode, bits=v.bits, N=v.N, K=v.K, E=v.E, M=M,
                   pairs=M * v.top_k, us_mlx=1e6 * t["mlx"], us_ours=1e6 * t["ours"],
                   chain_us_mlx=c["mlx"], chain_us_ours=c["ours"])
        row["speedup"] = judged_speedup(M, t["mlx"] / t["ours"], c["mlx"] / c["ours"])
        rows.append(row)
    return rows


def tunes_glu(variant: Variant, device, split) -> bool:
    """Whether the variant's fused gate/up launch is tuned: a SwitchGLU pair at a
    split a block of both weights' warps holds (plan.plan_gather_glu's)."""
    # Metal has no fused gate/up kernel (launch.gather_glu is CUDA's alone): nothing to tune there.
    return variant.glu and device.backend == "cuda" and 2 * split[0] <= max(planner.WARP_CHOICES)


def tune_glu(variant: Variant, device, split, quick: bool, table: Dict, meta) -> Dict:
    """``table`` with the variant's fused gate/up launch checked, timed and merged in."""
    reason = check(variant, device, split, glu=True)
    rows = [] if reason else measure(variant, device, split, quick, glu=True)
    return build_table(table, variant, split, rows, reason, meta, glu=True)


# -- the table --------------------------------------------------------------------------------


def base_table(device) -> Dict:
    """What a run starts from: the user's table for the device, else the shipped one."""
    planner.load_tuning.cache_clear()
    return json.loads(json.dumps(planner.load_tuning(device.name)))


def build_table(table: Dict, variant: Variant, split, rows: List[Dict], reason, meta,
                glu: bool = False) -> Dict:
    """``table`` with one variant's results merged in (its failure, or its
    split and winning range); with ``glu``, its fused gate/up launch's (failed's
    "moe_glu" kind, ``moe_glu_p_range``; the split is the grouped kernel's)."""
    table.update(device=meta["device"], mlx=meta["mlx"], measured_with=meta["command"],
                 min_speedup=planner.MIN_SPEEDUP, decode_min_speedup=planner.DECODE_MIN_SPEEDUP)
    failed = table.setdefault("failed", {})
    key = variant.glu_failed_key if glu else variant.failed_key
    entry = "moe_glu_p_range" if glu else "m_range" if variant.op == "dense" else "moe_p_range"
    ranges = table.setdefault(entry, {})
    if reason is not None:
        failed[key] = reason
        ranges[variant.range_key] = [0, 0]
        return table
    failed.pop(key, None)
    if variant.op == "dense":
        shape = f"{variant.N}x{variant.K}"
        for name, value in zip(("warps_k", "depth", "row_tiles"), split):
            table.setdefault(name, {})[shape] = value
        ranges[variant.range_key] = list(planner.winning_range(
            (r["M"], r["speedup"], r["M"]) for r in rows))
        return table
    if not glu:  # the split the rows ran at, which the fused launch shares (plan.moe_split)
        for name, value in zip(("moe_warps_k", "moe_depth"), split):
            table.setdefault(name, {})[variant.shape] = value
    ranges.update(kernels.moe_ranges(rows))
    return table


def write_table(path: str, table: Dict) -> None:
    """Written beside and renamed into place: the planner never reads half a table."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def tune(variants: List[Variant], device, quick: bool, command: str,
         deadline: Optional[float] = None, stream=None) -> Tuple[str, Dict, Dict]:
    """Check, time and record every variant (progress on ``stream``); returns
    (table path, table, {variant: failure reason or None})."""
    path = planner.user_tuning_path(device.name)
    table = base_table(device)
    meta = dict(device=device.name, mlx=mx.__version__, command=command)
    outcome = {}
    progress, stop = Progress(len(variants), stream), Deadline(deadline)
    for variant in variants:
        if not progress.step(stop, str(variant)):
            break
        split = choose_split(variant, device, table, quick)
        reason = check(variant, device, split)
        rows = [] if reason else measure(variant, device, split, quick)
        table = build_table(table, variant, split, rows, reason, meta)
        if reason is None and tunes_glu(variant, device, split):  # a failed grouped kernel plans no fused one
            table = tune_glu(variant, device, split, quick, table, meta)
        write_table(path, table)
        outcome[variant] = reason
    progress.finish()
    planner.load_tuning.cache_clear()
    return path, table, outcome
