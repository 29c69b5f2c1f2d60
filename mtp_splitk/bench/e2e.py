# Copyright © 2026 mtp_splitk contributors

"""End-to-end tokens/s: plain and speculative decoding, with and without the patch.

What is measured, per model (synthetic, real shapes, random 4-bit weights,
loaded by ``mlx_lm.load``):

- ``plain``: mlx-lm's own ``generate_step`` (pipelined), unpatched and patched;
- ``acceptance``: the speculative loops (``--loops``: the overlapped loop,
  the synchronous one) with the acceptance-controlled
  drafter (the target's recorded greedy continuation, each token proposed
  with probability p, another token otherwise) for every (p, k), unpatched
  and patched: the system at a known acceptance rate, whatever the random
  weights make of the text. The continuation is recorded on the verify
  path (the loop itself at p = 1, same k; see ``reference`` below), and
  each run says whether it reproduced it;
- ``draft``: the speculative loop with a real draft model (a smaller
  synthetic model of the same family and vocabulary);
- ``mtp``: the speculative loop with an MTP head (a model with one);
- ``verify``: the latency of one synchronous target forward of M rows on a
  warm cache (the verify step), M = 1..17, unpatched and patched;
- ``breakdown``: where a forward's time goes (attention, MLP or MoE, LM head,
  the rest), per component, at M = 1 and M = k + 1.

Generation tokens/s leaves the prompt out: tokens after the first step over
the time from the first step's tokens to the last token, median over
``repeats``. Prompt processing is reported separately. Results are written
(and rewritten as they come in, so a time-boxed run keeps what it measured)
to ``<out>/bench_e2e.json`` and ``<out>/bench_e2e.md``.
"""

import sys
from pathlib import Path
from typing import Dict

from .. import kernel_op, ops
from . import models, report
from .harness import ByteProgress, Deadline, Progress, Results, device_meta
from .measure import LOOPS, loop_options
from .tasks import model_tasks, mtp_tasks

ACCEPTANCES = (0.6, 0.8, 0.9)
DRAFT_TOKENS = (2, 4, 6)
VERIFY_MS = tuple(range(1, 18))


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="benchmarks/e2e", help="results directory")
    parser.add_argument(
        "--models",
        default=",".join(models.MODELS),
        help=f"comma-separated, of {', '.join(models.MODELS)}",
    )
    parser.add_argument("--no-draft", action="store_true", help="skip the draft-model runs")
    parser.add_argument("--no-mtp", action="store_true", help="skip the MTP-head model")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="where synthetic models are written (default: the mtp-splitk cache)",
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--acceptance", default=",".join(map(str, ACCEPTANCES)))
    parser.add_argument("--num-draft-tokens", default=",".join(map(str, DRAFT_TOKENS)))
    parser.add_argument(
        "--no-kernel-derivatives",
        action="store_true",
        help="kernel calls without MLX's derivatives (mx.custom_function): measures what "
        "that wrapper costs; gradients through kernel calls then fail",
    )
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        help="speculative loops to measure: overlap (no host sync per step), sync "
        "(the synchronous loop), every=N (synchronous, submitted every N decoder layers)",
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
        help="a tiny model, few tokens: checks the harness (CPU), no speed claims",
    )


def run(args) -> Dict:
    """Run the benchmark for parsed ``args``; returns the results document."""
    acceptances = [float(v) for v in args.acceptance.split(",")]
    draft_tokens = [int(v) for v in args.num_draft_tokens.split(",")]
    if args.no_kernel_derivatives:
        kernel_op.DERIVATIVES = False
        ops.clear_cache()
    loops = tuple(v for v in args.loops.split(",") if v)
    for loop in loops:
        loop_options(loop)  # one clear error for a bad value
    if not all(0.0 <= p <= 1.0 for p in acceptances) or not all(k >= 1 for k in draft_tokens):
        raise ValueError(
            "--acceptance values must be in [0, 1] and --num-draft-tokens values >= 1."
        )
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in models.MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected some of {list(models.MODELS)}.")
    root = Path(args.model_dir) if args.model_dir else models.default_root()
    deadline = Deadline(args.deadline)
    meta = device_meta()
    meta.update(
        max_tokens=args.max_tokens, repeats=args.repeats, kernel_derivatives=kernel_op.DERIVATIVES
    )
    results = Results(Path(args.out), meta, "bench_e2e", report.e2e_markdown)

    if args.smoke:
        target, draft = models.smoke_pair(root)
        jobs = [("tiny-llama", target, None if args.no_draft else draft)]
        mtp_model = ("qwen3_next", "tiny")
        verify_ms = (1, 3, 5)
    else:
        jobs = []
        for n in names:
            family, size, draft_family, draft_size = models.MODELS[n]
            print(
                f"{n}: synthetic model directories under {root} (written on first use)",
                file=sys.stderr,
                flush=True,
            )
            target = models.model_dir(
                root, family, size, progress=ByteProgress(f"  writing {family} {size}")
            )
            draft = None
            if not args.no_draft:
                progress = ByteProgress(f"  writing {draft_family} {draft_size}")
                draft = models.model_dir(root, draft_family, draft_size, progress=progress)
            jobs.append((n, target, draft))
        mtp_model = models.MTP_MODEL
        verify_ms = VERIFY_MS
    if args.no_mtp:
        mtp_model = None

    common = dict(
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        draft_tokens=draft_tokens,
        loops=loops,
    )
    heads, rests = [], []
    for name, target, draft in jobs:
        head, rest = model_tasks(
            name,
            target,
            results,
            acceptances=acceptances,
            draft_path=draft,
            verify_ms=verify_ms,
            **common,
        )
        heads += head
        rests += rest
    tasks = heads + rests
    if mtp_model is not None:
        family, size = mtp_model
        name = f"{family}-{size}-mtp"
        tasks += mtp_tasks(name, models.model_dir(root, family, size, mtp=True), results, **common)

    progress = Progress(len(tasks))
    for message, task in tasks:
        if not progress.step(deadline, message):
            break
        task()
    results.doc["meta"]["complete"] = progress.done == len(tasks)
    results.save()
    progress.finish()
    return results.doc
