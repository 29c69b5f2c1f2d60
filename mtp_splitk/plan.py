# Copyright © 2026 mtp_splitk contributors

"""Decide, in pure Python, whether a quantized matmul goes to a split-K kernel.

A plan's shape (warps along K, rows per block) is chosen from (N, K, mode,
bits, device) and never from M, so a row's result does not depend on how many
other rows share the call (batch invariance: a verify pass reproduces decode
bit for bit at the matmul level). M only decides *whether* the kernel is used:
within the range of M where it measured faster than MLX on the device, kept in
``tuning/<device>.json`` (written by scripts/bench_kernels.py --tune). Where
that range excludes M = 1, decode and verify take different kernels and are
equal only to rounding; ``set_split(n)`` forces the kernel for every M <= 64.
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from . import cache

TUNING_DIR = os.path.join(os.path.dirname(__file__), "tuning")

ROWS_PER_TILE = 16  # weight rows per MMA tile (the m16 side of m16n8k16)
K_PER_CHUNK = 128  # K covered by one warp step: 4 lanes x 32 weights
TOKENS_PER_TILE = 8  # tokens per MMA tile (the n8 side)
MAX_TOKEN_TILES = 8  # so at most 64 rows of x per call
# At most 8 warps (256 threads) a block: MLX launches without launch bounds, so a
# 512-thread block of a ~128-register variant would not fit an SM's registers.
WARP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Plan:
    backend: str  # "cuda" or "metal"
    mode: str
    bits: int
    group_size: int
    N: int
    K: int
    warps_k: int  # split factor: warps of a block that share its rows, each a K slice
    token_tiles: int  # see token_tiles_for; the only M-dependent field, it never changes the math
    depth: int = 1  # K chunks in flight per warp (register prefetch ring)
    row_tiles: int = 1  # 16-row tiles per warp, sharing each x fragment
    lean: bool = False  # CUDA: dequantize per 16-byte x load (fewer registers)
    # depth, row_tiles and lean only decide which warp computes a row and when its
    # loads are issued, never the arithmetic of an output, so they may follow M.

    @property
    def blocks(self) -> int:
        return -(-self.N // (ROWS_PER_TILE * self.row_tiles))


def token_tiles_for(M: int) -> int:
    """Tiles of 8 tokens a call computes: ceil(M / 8) rounded up to 1, 2, 4
    or 8. Each value is a compiled variant, so rounding keeps a model's
    first-call JIT work to four variants per layer type; padded tokens are
    computed and never stored."""
    tiles = -(-M // TOKENS_PER_TILE)
    return 1 << (tiles - 1).bit_length()


@dataclass(frozen=True)
class Device:
    backend: str  # "cuda", "metal" or "cpu"
    name: str
    sm_count: int


@lru_cache(maxsize=1)
def current_device() -> Device:
    """The default device as the planner sees it (cached; call cache_clear to re-read)."""
    if mx.default_device() == mx.cpu:
        return Device("cpu", "cpu", 0)
    info = mx.device_info()
    name = str(info.get("device_name", "unknown"))
    if mx.cuda.is_available():
        sms = int(info.get("multi_processor_count", info.get("sm_count", 132)))
        return Device("cuda", name, sms)
    if mx.metal.is_available():
        # Apple GPUs report no core count through MLX; 10 cores is the smallest M-series.
        return Device("metal", name, int(info.get("gpu_cores", 10)))
    return Device("cpu", name, 0)


def tuning_key(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def user_tuning_path(device_name: str) -> str:
    """Where ``mtp-splitk tune`` writes this device's table: the user's cache."""
    return os.path.join(cache.root(), "tuning", tuning_key(device_name) + ".json")


@lru_cache(maxsize=None)
def load_tuning(device_name: str) -> dict:
    """This device's tuning table: the user's (``mtp-splitk tune``) before the
    committed one; {} if neither was measured."""
    shipped = os.path.join(TUNING_DIR, tuning_key(device_name) + ".json")
    for path in (user_tuning_path(device_name), shipped):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {}


def failed(tuning: dict, op: str, mode: str, bits: int, group_size: int, shape: str) -> bool:
    """Whether ``mtp-splitk tune`` found the kernel wrong for this op ("dense",
    "moe", or "moe_glu": SwitchGLU's fused gate/up), mode and weight shape on this
    device: then it is never planned."""
    return f"{op}:{mode}:b{bits}:g{group_size}:{shape}" in tuning.get("failed", {})


def supported(mode: str, bits: int, group_size: int, K: int, dtype) -> bool:
    """What the kernels implement; everything else stays on MLX's path."""
    if dtype not in (mx.bfloat16, mx.float16):
        return False  # float32 keeps MLX's full-precision path
    if mode == "affine" and bits not in (2, 3, 4, 5, 6, 8):
        return False
    # Each lane owns 32 consecutive weights of a row, so K must be a multiple of 32.
    return K % 32 == 0 and K >= K_PER_CHUNK


def choose_warps_k(N: int, K: int, sm_count: int, target_warps_per_sm: int = 4) -> int:
    """Split factor from the shape and the device alone (never from M).

    Enough warps in flight to keep the memory system busy: about
    ``target_warps_per_sm`` per SM, but no more warps than K has chunks. The
    default of 4 is what the H100 sweep picked (2 warps for N >= 2560, 4 for
    smaller grids); measured shapes use the tuning table's split instead.
    """
    blocks = -(-N // ROWS_PER_TILE)
    chunks = -(-K // K_PER_CHUNK)
    want = max(1, sm_count * target_warps_per_sm // blocks)
    best = 1
    for w in WARP_CHOICES:
        if w <= want and w <= chunks:
            best = w
    return best


# Above 1.0: per-op timing omits host cost and dependent-op overlap (benchmarks/h200/RUNS.md).
MIN_SPEEDUP = 1.2

# M = 1 is judged in a dependent chain (bench.tune.judged_speedup). A chain of one shape flatters
# ours there too: Llama's MLP taken at 1.12-1.14x made plain decode 0.73x (run 14); LM heads clear 1.8x.
DECODE_MIN_SPEEDUP = 1.5


def required_speedup(M: int) -> float:
    """The per-op speedup over MLX a call of M tokens must measure."""
    return DECODE_MIN_SPEEDUP if M == 1 else MIN_SPEEDUP


def winning_range(measured) -> tuple:
    """(lo, hi): the longest run of consecutive measured sizes (M, or pairs
    for MoE) whose speedup over MLX reaches ``required_speedup`` of their
    token count; (0, 0) if none. ``measured`` is an iterable of
    (size, MLX time / ours, tokens M)."""
    best, run = (0, 0), None
    for size, speedup, M in sorted(measured):
        if speedup >= required_speedup(M):
            run = (run[0] if run else size, size)
            if best == (0, 0) or run[1] - run[0] > best[1] - best[0]:
                best = run
        else:
            run = None
    return best


def m_range(tuning: dict, mode: str, bits: int, N: int, K: int) -> tuple:
    """(lo, hi): the M values for which the kernel measured at least
    ``required_speedup(M)`` times faster than MLX (the table's ``m_range``).

    A shape that was not measured takes the range of the measured shape of
    the same mode whose weight size is nearest (same order of bytes, same
    balance of kernel time against launch cost). (0, 0) means never.
    """
    table = tuning.get("m_range", {})
    prefix = f"{mode}{bits}:"
    exact = table.get(f"{prefix}{N}x{K}")
    if exact is not None:
        return tuple(exact)
    best, best_dist = (0, 0), None
    for key, value in table.items():
        if not key.startswith(prefix):
            continue
        n, k = map(int, key[len(prefix):].split("x"))
        dist = abs(math.log(n * k) - math.log(N * K))
        if best_dist is None or dist < best_dist:
            best, best_dist = tuple(value), dist
    return best


def plan_dense(
    M: int,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    mode: str,
    dtype,
    device: Optional[Device] = None,
    in_range: bool = True,
) -> Optional[Plan]:
    """A Plan for ``x (M, K) @ dequant(w (N, K)).T``, or None for MLX's own op;
    with ``in_range=False`` the plan the kernel would take whatever the table's M
    range (a rider of a fused launch, :func:`plan_multi`)."""
    device = device or current_device()
    if device.backend not in ("cuda", "metal") or M < 1:
        return None
    override = forced_split()
    if override == 0 or not supported(mode, bits, group_size, K, dtype):
        return None
    tuning = load_tuning(device.name)
    if M > MAX_TOKEN_TILES * TOKENS_PER_TILE:
        return None
    if failed(tuning, "dense", mode, bits, group_size, f"{N}x{K}"):
        return None
    if override is None and in_range:
        lo, hi = m_range(tuning, mode, bits, N, K)
        if not lo <= M <= hi:
            return None
    shape = f"{N}x{K}"
    warps = override or tuning.get("warps_k", {}).get(shape)
    warps = warps or choose_warps_k(N, K, device.sm_count)
    depth = tuning.get("depth", {}).get(shape, tuning.get("default_depth", 1))
    tiles = token_tiles_for(M)
    # Two row tiles per warp halve the x traffic per weight, but their
    # registers only fit beside one or two token tiles.
    row_tiles = tuning.get("row_tiles", {}).get(shape, 1) if tiles <= 2 else 1
    return Plan(
        backend=device.backend,
        mode=mode,
        bits=bits,
        group_size=group_size,
        N=N,
        K=K,
        warps_k=int(warps),
        token_tiles=tiles,
        depth=int(depth),
        row_tiles=int(row_tiles),
        lean=lean(device.backend, tiles),
    )


def lean(backend: str, token_tiles: int) -> bool:
    """Whether a launch takes the kernel's lean K loop (Plan.lean, CUDA: the same
    outputs with fewer registers; 7-18% faster per op on layers of 16 MB and more
    at one token tile in run 20). MTP_SPLITK_LEAN=0 keeps the plain loop; it takes
    up to MTP_SPLITK_LEAN_TILES token tiles (1 until more are measured on a GPU)."""
    if backend != "cuda" or os.environ.get("MTP_SPLITK_LEAN", "1") == "0":
        return False
    return token_tiles <= int(os.environ.get("MTP_SPLITK_LEAN_TILES", "1"))


@dataclass(frozen=True)
class FusedPlan:
    """One launch for several weights that share x, K and quantization (q/k/v,
    gate/up): ``members`` holds, in the weights' order, the Plan each weight's
    own call takes, all with the same constants (split, token tiles, depth, row
    tiles), so a weight's rows compute in the fused launch what they compute alone."""

    members: tuple  # of Plan

    @property
    def blocks(self) -> int:
        return sum(p.blocks for p in self.members)


MAX_FUSED = 3  # weights one fused launch takes (q, k and v)


def plan_multi(
    M: int,
    Ns,
    K: int,
    bits: int,
    group_size: int,
    mode: str,
    dtype,
    device: Optional[Device] = None,
) -> Optional[FusedPlan]:
    """A FusedPlan for ``x (M, K) @ dequant(w_i (N_i, K)).T``, one weight per N_i
    in ``Ns``, or None for one call per weight.

    Only where :func:`plan_dense` plans the kernel for every weight at this M (so
    the fused and the unfused path agree on which path each weight takes) and
    gives all of them the same split, the one field that fixes a row's
    arithmetic: then each fused output is bit-identical to the unfused one. With
    :func:`riders` on, weights outside their M range join a planned widest weight
    (at their own split, so still bit-identical to their kernel alone).
    Depth and row tiles, which never change the arithmetic, are those of the
    weight with the most rows.
    """
    if not 2 <= len(Ns) <= MAX_FUSED:
        return None
    device = device or current_device()
    plans = [plan_dense(M, N, K, bits, group_size, mode, dtype, device) for N in Ns]
    if riders() and plans[Ns.index(max(Ns))] is not None:
        # A weight MLX would take rides along in the widest weight's launch at the plan
        # the kernel gives it alone (its split: each of its rows the same bits at every M).
        plans = [p or plan_dense(M, N, K, bits, group_size, mode, dtype, device, in_range=False)
                 for p, N in zip(plans, Ns)]
    if any(p is None for p in plans) or len({p.warps_k for p in plans}) != 1:
        return None
    lead = max(plans, key=lambda p: p.N)
    return FusedPlan(tuple(replace(p, depth=lead.depth, row_tiles=lead.row_tiles, lean=lead.lean) for p in plans))


def riders() -> bool:
    """Whether :func:`plan_multi` lets weights MLX would take ride in the widest
    weight's fused launch (q/k/v: k and v beside a planned q). Only with
    MTP_SPLITK_RIDERS=1 until measured on a GPU."""
    return os.environ.get("MTP_SPLITK_RIDERS", "0") == "1"


def plan_glu(
    M: int,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    mode: str,
    dtype,
    device: Optional[Device] = None,
) -> Optional[FusedPlan]:
    """A FusedPlan for gate and up (both (N, K)) with ``silu(gate) * up`` in the
    same launch, or None. A block holds the warps of both weights (twice the
    split), so splits above half of ``max(WARP_CHOICES)`` are declined; CUDA
    only (the Metal kernel has no fused activation)."""
    plan = plan_multi(M, (N, N), K, bits, group_size, mode, dtype, device)
    if plan is None or plan.members[0].backend != "cuda":
        return None
    return plan if 2 * plan.members[0].warps_k <= max(WARP_CHOICES) else None


MAX_PAIRS = 1024  # (token, expert) pairs a grouped MoE call can hold (kernel's shared list)
MAX_EXPERTS = 1024


def plan_gather(
    P: int,
    E: int,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    mode: str,
    dtype,
    device: Optional[Device] = None,
    ranges: str = "moe_p_range",
) -> Optional[Plan]:
    """A Plan for the grouped MoE kernel over P (token, expert) pairs of E
    experts of shape (N, K), or None for mx.gather_qmm: where the table's
    ``ranges`` (the pair counts measured faster than MLX) hold P.

    The split comes from the expert shape alone (:func:`moe_split`), never
    from P, so a pair's result does not depend on the batch. Each active
    expert takes its pairs 8 at a time (one token tile): a verify batch
    rarely routes more than 8 tokens to one expert.
    """
    device = device or current_device()
    if device.backend not in ("cuda", "metal") or not 1 <= P <= MAX_PAIRS or E > MAX_EXPERTS:
        return None
    override = forced_split()
    if override == 0 or not supported(mode, bits, group_size, K, dtype):
        return None
    tuning = load_tuning(device.name)
    if failed(tuning, "moe", mode, bits, group_size, f"{E}x{N}x{K}"):
        return None
    if override is None:
        lo, hi = m_range({"m_range": tuning.get(ranges, {})}, mode, bits, E * N, K)
        if not lo <= P <= hi:
            return None
    warps, depth = moe_split(tuning, E, N, K, device.sm_count)
    return Plan(backend=device.backend, mode=mode, bits=bits, group_size=group_size, N=N, K=K,
                warps_k=int(override or warps), token_tiles=1, depth=int(depth), lean=lean(device.backend, 1))


def plan_gather_glu(
    P: int,
    E: int,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    mode: str,
    dtype,
    device: Optional[Device] = None,
) -> Optional[Plan]:
    """The Plan of SwitchGLU's gate and up (both E experts of (N, K)) in one
    grouped launch with the activation (``launch.gather_glu``), or None: where
    the table's ``moe_glu_p_range`` says the fused launch measured faster than
    MLX's two gather_qmm and swiglu (scripts/bench_moe.py --tune or
    ``mtp-splitk tune``; a forced split skips that), which is its own range, not
    the unfused kernel's (run 14: 1.44x at 40 pairs on Qwen3-30B-A3B, where the
    unfused one is 1.18x), on CUDA, at splits of at most half of
    ``max(WARP_CHOICES)`` (a block holds both weights' warps), and never where
    tune's check failed it (``failed``'s "moe_glu", even forced). Its split and
    depth are the grouped kernel's."""
    device = device or current_device()
    plan = plan_gather(P, E, N, K, bits, group_size, mode, dtype, device, ranges="moe_glu_p_range")
    if plan is None or plan.backend != "cuda" or 2 * plan.warps_k > max(WARP_CHOICES):
        return None
    if failed(load_tuning(device.name), "moe_glu", mode, bits, group_size, f"{E}x{N}x{K}"):
        return None
    return plan


def plan_gated_delta(Hk: int, Hv: int, dk: int, dtype, device: Device) -> bool:
    """Whether the Gated DeltaNet recurrence kernel (kernels/gated_delta.cu) takes
    a pass: CUDA, a lane's dk / 32 state entries in registers (dk a multiple of 32,
    at most 256), whole groups of value heads a key head, bfloat16 or float16
    activations; not with the split forced off, nor with MTP_SPLITK_GATED_DELTA=0
    (MLX's ops, for comparison)."""
    return (
        device.backend == "cuda"
        and _forced != 0
        and os.environ.get("MTP_SPLITK_GATED_DELTA", "1") != "0"
        and dk % 32 == 0
        and 32 <= dk <= 256
        and Hk > 0
        and Hv % Hk == 0
        and dtype in (mx.bfloat16, mx.float16)
    )


def moe_split(tuning: dict, E: int, N: int, K: int, sm_count: int) -> tuple:
    """(warps along K, depth) of the grouped kernel for E experts of (N, K): the
    table's (``moe_warps_k``, ``moe_depth``, swept by scripts/bench_moe.py --tune),
    else the rule for 8 active experts and one chunk in flight."""
    shape = f"{E}x{N}x{K}"
    warps = tuning.get("moe_warps_k", {}).get(shape) or choose_warps_k(8 * N, K, sm_count)
    return warps, tuning.get("moe_depth", {}).get(shape, 1)


# --split-k from the CLI: None = auto (tuning table), 0 = off, n = force n warps along K.
_forced: Optional[int] = None


def forced_split() -> Optional[int]:
    return _forced


def parse_split(text: str) -> Optional[int]:
    """``auto`` -> None, ``off`` -> 0, ``N`` -> N (what :func:`set_split` takes);
    ValueError for anything else."""
    value = text.strip().lower()
    if value in ("auto", "off"):
        return None if value == "auto" else 0
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n != 0 and n not in WARP_CHOICES:
        raise ValueError(f"expected auto, off or one of {', '.join(map(str, WARP_CHOICES))}; got {text!r}")
    return n


def set_split(value: Optional[int]) -> None:
    """Set the split policy: None = auto, 0 = always MLX, n > 0 = n warps along K."""
    global _forced
    if value is not None and (value < 0 or (value and value not in WARP_CHOICES)):
        raise ValueError(
            f"split-K must be 'auto', 'off' or one of {', '.join(map(str, WARP_CHOICES))}; got {value}."
        )
    _forced = value


@contextlib.contextmanager
def split(value: Optional[int]):
    """Within the block, the split policy is ``value`` (as for
    :func:`set_split`); the previous policy comes back after it."""
    previous = _forced
    set_split(value)
    try:
        yield
    finally:
        set_split(previous)
