# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk tune``: check and time the split-K kernels on this GPU (CUDA
or Metal) for a model's shapes and write the tuning table the planner reads
before the shipped ones (:mod:`mtp_splitk.bench.tune`)."""

import sys

from .. import plan
from ..bench import tune
from . import PROG, DefaultsFormatter, Parser, UsageError, check_model_path


def setup_arg_parser() -> Parser:
    parser = Parser(
        prog=f"{PROG} tune",
        formatter_class=DefaultsFormatter,
        description=(
            "Check every split-K kernel variant a model's shapes need against MLX's op on "
            "this GPU (fresh random inputs, NaN-poisoned outputs, every quantization mode "
            "the model uses), time the ones that pass (independent ops and dependent "
            "chains) and write the tuning table to the cache, where the planner looks "
            "before the shipped tables. A variant that fails the check is recorded and "
            "never planned. On a Mac this is how the Metal kernels are verified."
        ),
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="a model directory (or Hugging Face repo) whose quantized matmuls to tune; "
        "default: the shapes of the shipped tables (Llama-3-8B's and Qwen3's, 4-bit)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="M = 1..8 only, fewer repeats, the shipped or planner's split (no sweep)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after which the remaining variants are skipped (the table keeps "
        "what was measured; default: none)",
    )
    return parser


def variants_of(model_path: str):
    """The variants of a model's quantized layers, loaded lazily (nothing is read
    but the shapes), MTP tensors in its shards dropped."""
    import mlx_lm

    from ..mtp.loading import dropping_mtp_keys

    check_model_path(model_path, "--model")
    with dropping_mtp_keys():
        model, _ = mlx_lm.load(model_path, lazy=True)
    found = tune.model_variants(model)
    if not found:
        raise UsageError(f"--model {model_path}: no quantized matmuls to tune (not quantized?)")
    return found


def glu_summary(variant, table) -> str:
    """The fused gate/up launch's part of a variant's line: its failure or pair
    range where tune wrote one (none on Metal, which has no such kernel)."""
    reason = table.get("failed", {}).get(variant.glu_failed_key)
    if reason is not None:
        return f"; fused gate/up FAILED (never planned): {reason}"
    glu = table.get("moe_glu_p_range", {}).get(variant.range_key)
    if not variant.glu or glu is None or plan.current_device().backend != "cuda":
        return ""
    return f"; fused gate/up pairs {glu[0]}..{glu[1]}" if glu[1] else "; fused gate/up never faster: MLX"


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    device = plan.current_device()
    if device.backend == "cpu":
        raise UsageError("tune needs a GPU (MLX's default device is the CPU)")
    found = variants_of(args.model) if args.model else tune.default_variants()
    variants = [v for v in found if tune.runnable(v)]
    skipped = len(found) - len(variants)
    print(
        f"[{PROG}] tuning {len(variants)} kernel variants on {device.name} ({device.backend})"
        + (f"; {skipped} the kernels do not implement stay on MLX's ops" if skipped else ""),
        file=sys.stderr,
        flush=True,
    )
    command = " ".join([PROG, "tune", *(argv if argv is not None else sys.argv[2:])])
    path, table, outcome = tune.tune(variants, device, args.quick, command, args.deadline)
    failed = {v: r for v, r in outcome.items() if r is not None}
    for variant, reason in failed.items():
        print(f"[{PROG}] FAILED (never planned): {variant}: {reason}", file=sys.stderr)
    planned = []
    for v in outcome:
        if v not in failed:
            ranges = table["m_range" if v.op == "dense" else "moe_p_range"]
            lo, hi = ranges.get(v.range_key, (0, 0))
            unit = "M" if v.op == "dense" else "pairs"
            planned.append(f"{v}: {f'{unit} {lo}..{hi}' if hi else 'never faster: MLX'}"
                           + glu_summary(v, table))
    print("\n".join(planned))
    print(
        f"{len(outcome)} of {len(variants)} variants tuned, {len(failed)} failed the check; "
        f"table: {path} (read before the shipped tables)"
    )
    return 0
