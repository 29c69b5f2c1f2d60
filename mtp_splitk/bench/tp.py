# Copyright © 2026 mtp_splitk contributors

"""Tensor-parallel verify latency and greedy agreement, sharded vs one device.

Every rank runs this. For each model (synthetic, real shapes, random
4-bit weights, written once):

1. one device: the whole model on each rank's own device; greedy tokens of
   mlx-lm's plain loop and of the speculative loop (acceptance-controlled
   drafter, p = 0.8), and the verify-step latency for M = 1..17 (one
   synchronous forward of M rows on a warm cache), unpatched and patched;
2. sharded: the model split with mlx-lm's ``model.shard(group)`` over all
   ranks, the same runs;
3. agreement: where the sharded tokens part from the one-device tokens (in
   bfloat16 on GPUs the sums of the shards round differently, so a greedy
   near-tie may flip; the CPU smoke run is float32 and must match exactly);
4. plans: for every per-device matmul shape, the split-K plan at M = 1 and
   M = k + 1, next to the plan for the full shape.

Rank 0 writes <out>/bench_tp.json and <out>/bench_tp.md, after every
measurement. Measurements are collective (the ranks meet in every sharded
layer's sum), so the deadline is agreed on by all ranks before each one.

    # 2 GPUs, NCCL (one host; the ranks share --model-dir):
    mlx.launch --backend nccl -n 2 -- mtp-splitk bench tp --out benchmarks/tp
    # CPU smoke: starts 2 ring ranks on 127.0.0.1 itself; a tiny float32 MoE
    mtp-splitk bench tp --smoke --out /tmp/tp
"""

import gc
import os
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm import load

from .. import cache, patch, plan, synthetic, tp
from . import models, report
from .drafters import AcceptanceControlledDrafter
from .harness import ByteProgress, Deadline, Results, device_meta
from .measure import STATES, greedy_runs, plain_decode, prompt_tokens, verify_latency
from .ring import RankFailure, launch_local

MODELS = {  # name: (family, size)
    "qwen3-30b-a3b": ("qwen3_moe", "qwen3-30b-a3b"),
    "llama3-8b": ("llama", "llama3-8b"),
}
# Tiny widths split over 2 devices leave 32 weights per row in the row-split
# layers, so the smoke model is quantized in groups of 32 (64 would not fit).
SMOKE = ("qwen3_moe", {"bits": 4, "group_size": 32, "mode": "affine"})
VERIFY_MS = tuple(range(1, 18))
ACCEPTANCE = 0.8


# -- measurements ---------------------------------------------------------------------------


def greedy(model, prompt, reference, k, max_tokens):
    """{state: {"plain" | "acceptance": tokens}} (see measure.greedy_runs)."""
    vocab = model.args.vocab_size
    drafters = {
        "acceptance": lambda m: AcceptanceControlledDrafter(
            reference + [0] * (k + 1), ACCEPTANCE, vocab, seed=k
        )
    }
    return greedy_runs(model, prompt, max_tokens, drafters, k)


def verify(model, Ms, reps):
    out = {}
    for label, on in STATES:
        with patch.enabled(on):
            out[label] = verify_latency(model, Ms, 64, reps)
    return out


def agreement(single: dict, sharded: dict) -> dict:
    """Per state and run: equal, or the index of the first differing token."""
    out = {}
    for label, runs in sharded.items():
        for run, tokens in runs.items():
            ref = single[label][run]
            diff = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
            if diff is None and len(tokens) != len(ref):
                diff = min(len(tokens), len(ref))
            out[f"{label} {run}"] = {"equal": diff is None, "first_difference": diff}
    return out


def plans(model, full_shapes: dict, k: int, dtype) -> dict:
    """The planner's choice for each per-device matmul shape of a sharded
    model, next to its choice for the full shape: "-" is MLX's own op, "wN"
    the split-K kernel with N warps along K."""
    shapes = tp.matmul_shapes(model)
    rows = {}
    for path, m in model.named_modules():
        if path not in shapes:
            continue
        cls, shape = shapes[path]
        # Embeddings are lookups (a tied head is replicated: not the point
        # here); MLA's per-head projections are batched matmuls, not planned.
        if cls in ("QuantizedEmbedding", "QuantizedMultiLinear"):
            continue
        key = f"{cls} {'x'.join(map(str, shape))}"
        if key in rows:
            continue
        full = tuple(full_shapes[path][1])
        quant = (m.bits, m.group_size, getattr(m, "mode", "affine"), dtype)
        row = {"full": "x".join(map(str, full))}
        for M in (1, k + 1):
            for label, s in (("", shape), (" full", full)):
                if len(s) == 2:
                    p = plan.plan_dense(M, s[0], s[1], *quant)
                else:  # experts: M tokens x top-8 pairs (Qwen3-MoE, DeepSeek-V3)
                    p = plan.plan_gather(8 * M, s[0], s[1], s[2], *quant)
                row[f"M={M}{label}"] = "-" if p is None else f"w{p.warps_k}"
        rows[key] = row
    return rows


# -- the run --------------------------------------------------------------------------------


def agree(group, ok: bool) -> bool:
    """True on every rank only if it is true on every rank."""
    total = mx.distributed.all_sum(mx.array(1 if ok else 0), group=group).item()
    return total == group.size()


def model_path(args, group, name: str) -> Path:
    """The model directory; rank 0 writes it on first use while the others
    wait (the ranks of one host share it)."""
    root = Path(args.model_dir) if args.model_dir else models.default_root()

    def get():
        if not args.smoke:
            family, size = MODELS.get(name) or name.split(":")
            progress = (
                ByteProgress(f"  writing {family} {size}") if size in synthetic.SIZES else None
            )
            return models.model_dir(root, family, size, progress=progress)
        family, quantization = SMOKE
        return cache.build_once(
            root / f"tp-smoke-{family}-g32-f32-v{synthetic.FORMAT_VERSION}",
            lambda path: synthetic.write_model(
                path, family, quantization=quantization, dtype="float32"
            ),
        )

    if group.rank() == 0:
        get()
    tp.barrier(group)
    return get()  # written by now: only looks


def bench_model(args, group, results: Results, name: str, deadline: Deadline):
    k, Ms, max_tokens, reps = args.num_draft_tokens, args.verify_ms, args.max_tokens, args.repeats
    path = model_path(args, group, name)
    results.put(name, "info", "path", str(path))

    def log(message):
        if group.rank() == 0:
            print(f"[bench_tp] {name}: {message}", file=sys.stderr, flush=True)

    # 1. One device (each rank its own; rank 0's numbers are recorded).
    full_shapes, single, prompt, reference = None, None, None, None
    if not args.no_single and agree(group, not deadline.passed()):
        log("one device")
        model, tokenizer = load(str(path))
        prompt = prompt_tokens(tokenizer)
        full_shapes = tp.matmul_shapes(model)
        reference = plain_decode(model, prompt, max_tokens)["tokens"]
        single = greedy(model, prompt, reference, k, max_tokens)
        results.put(name, "tokens", "one device", single)
        results.put(name, "verify_ms", "one device", verify(model, Ms, reps))
        del model
        gc.collect()
        mx.clear_cache()

    # 2. Sharded.
    if not agree(group, not deadline.passed()):
        return
    log(f"sharded over {group.size()}")
    model, tokenizer = tp.load_sharded(path, group)
    if prompt is None:
        prompt = prompt_tokens(tokenizer)
        reference = plain_decode(model, prompt, max_tokens)["tokens"]
    sharded = greedy(model, prompt, reference, k, max_tokens)
    results.put(name, "tokens", f"sharded x{group.size()}", sharded)
    if single is not None:
        results.put(name, "agreement", f"sharded x{group.size()}", agreement(single, sharded))
    if agree(group, not deadline.passed()):
        results.put(name, "verify_ms", f"sharded x{group.size()}", verify(model, Ms, reps))
    if full_shapes is not None:
        dtype = model.model.norm.weight.dtype  # the activations' dtype
        results.put(name, "plans", f"sharded x{group.size()}", plans(model, full_shapes, k, dtype))
    del model
    gc.collect()
    mx.clear_cache()


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out", default="benchmarks/tp", help="results directory (rank 0 writes it)"
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, of {', '.join(MODELS)} or FAMILY:SIZE of mtp_splitk.synthetic "
        "(e.g. deepseek_v3:small)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="where synthetic models are written (default: the mtp-splitk cache)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="mx.distributed backend (default: nccl with CUDA, else ring)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per greedy run")
    parser.add_argument(
        "--num-draft-tokens", type=int, default=4, help="k of the speculative runs"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per M")
    parser.add_argument(
        "--no-single",
        action="store_true",
        help="skip the one-device runs (a model that does not fit one device)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after which remaining measurements are skipped",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU: 2 ring ranks on 127.0.0.1, a tiny float32 MoE, few tokens; "
        "fails unless sharded tokens equal one-device tokens",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="--smoke: seconds before the ranks are stopped"
    )


def _settle(args) -> None:
    """The smoke run's settings; the model names checked."""
    args.verify_ms = (1, 2, 4) if args.smoke else VERIFY_MS
    if args.smoke:
        args.max_tokens, args.num_draft_tokens, args.repeats = 16, 3, 2
        args.models = "tiny-" + SMOKE[0]
        return
    for name in args.models.split(","):
        family, _, size = name.partition(":")
        if name not in MODELS and (family not in synthetic.FAMILIES or not size):
            raise ValueError(
                f"unknown model {name!r}; expected one of {list(MODELS)} or FAMILY:SIZE"
            )


def run(args, argv) -> None:
    """Run the benchmark on this rank for parsed ``args``; with --smoke and
    not launched, start two ring ranks of ``mtp-splitk bench tp ARGV`` first."""
    _settle(args)
    if args.smoke and "MLX_RANK" not in os.environ:
        # Not launched: start the two ranks ourselves (what mlx.launch does).
        command = [sys.executable, "-m", "mtp_splitk.cli", "bench", "tp", *argv]
        try:
            outputs = launch_local(command, n=2, timeout=args.timeout)
        except RankFailure as e:
            sys.exit(f"bench_tp: {e}")
        sys.stderr.write(outputs[0])
        return
    backend = args.backend or ("nccl" if mx.cuda.is_available() else "ring")
    group = tp.init_group(backend)
    meta = device_meta()
    meta.update(
        ranks=group.size(),
        distributed=backend,
        smoke=args.smoke,
        repeats=args.repeats,
        max_tokens=args.max_tokens,
        num_draft_tokens=args.num_draft_tokens,
    )
    results = Results(Path(args.out), meta, "bench_tp", report.tp_markdown, write=group.rank() == 0)
    deadline = Deadline(args.deadline)
    for name in args.models.split(","):
        bench_model(args, group, results, name, deadline)
    results.doc["meta"]["complete"] = not deadline.passed()
    results.save()
    if args.smoke:
        # float32 on the CPU: the shards' sums round in the last bits only,
        # so every greedy run must match one device's.
        rows = next(iter(results.doc["models"].values())).get("agreement", {})
        bad = [run for r in rows.values() for run, v in r.items() if not v["equal"]]
        if not rows or bad:
            sys.exit(
                f"bench_tp: rank {group.rank()}: sharded tokens differ from one device's: {bad}"
            )
    tp.barrier(group)
