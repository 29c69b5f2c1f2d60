# Copyright © 2026 mtp_splitk contributors

"""End-to-end tokens/s: plain and speculative decoding, with and without the patch.

What is measured, per model (synthetic, real shapes, random 4-bit weights,
5-bit for the Qwen3-Next MTP models, loaded by ``mlx_lm.load``):

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
- ``mtp``: the speculative loop with an MTP head (``--mtp-model``: a model
  with one), steered to each acceptance p for each k of ``--mtp-draft-tokens``
  (the head runs as in real use, its proposals replaced by the recorded
  reference with probability p: the real drafting cost at a known
  acceptance), and on its own. Models whose caches the overlapped loop cannot
  take keep the synchronous loop where it is asked for; each run says which
  ran (``overlapped``, ``overlap_off``);
- ``verify``: the latency of one synchronous target forward of M rows on a
  warm cache (the verify step), M = 1..17, unpatched and patched;
- ``breakdown``: where a forward's time goes (attention, Gated DeltaNet in
  hybrids, MLP or MoE, LM head, the rest), per component, at M = 1 and
  M = k + 1 (an MTP model: at its headline k + 1).

Generation tokens/s leaves the prompt out: tokens after the first step over
the time from the first step's tokens to the last token, median over
``repeats``. Prompt processing is reported separately. Results are written
(and rewritten as they come in, so a time-boxed run keeps what it measured)
to ``<out>/bench_e2e.json`` and ``<out>/bench_e2e.md``; the run ends by
naming them.

``--model-path DIR`` measures one's own model instead of the synthetic ones
(``--draft-path`` adds draft-model runs, ``--mtp-path`` a model with an MTP
head). ``--smoke`` is a seconds-long run of every task on tiny models.
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..commands import check_model_path
from . import models, report
from .harness import ByteProgress, Deadline, Progress, Results, device_meta, host_probe
from .measure import LOOPS, loop_options
from .tasks import model_tasks, mtp_tasks

ACCEPTANCES = (0.6, 0.8, 0.9)
DRAFT_TOKENS = (2, 4, 6)
MTP_DRAFT_TOKENS = (1, 2, 3, 4)  # the steered MTP head's k
VERIFY_MS = tuple(range(1, 18))


# --smoke's defaults: every task once, on tiny models, in seconds.
SMOKE = {"max_tokens": 16, "repeats": 1, "acceptance": "0.8", "num_draft_tokens": "2"}
DEFAULTS = {
    "max_tokens": 256,
    "repeats": 3,
    "acceptance": ",".join(map(str, ACCEPTANCES)),
    "num_draft_tokens": ",".join(map(str, DRAFT_TOKENS)),
}


def add_arguments(parser) -> None:
    def default(name):  # the help's "(default: ...)" of a flag --smoke changes
        return f"(default: {DEFAULTS[name]}; with --smoke {SMOKE[name]})"

    parser.add_argument(
        "--out",
        default="benchmarks/e2e",
        help="results directory, relative to the current one (default: %(default)s)",
    )
    parser.add_argument(
        "--models",
        default=",".join(models.MODELS),
        help=f"synthetic models to measure, comma-separated, of {', '.join(models.MODELS)} "
        "(default: all); written once, each after a line saying the disk it takes "
        "(GBs: real shapes)",
    )
    parser.add_argument(
        "--model-path",
        default=None,
        metavar="DIR",
        help="measure this model directory instead of the synthetic models",
    )
    parser.add_argument(
        "--draft-path",
        default=None,
        metavar="DIR",
        help="with --model-path: a draft model for it (same vocabulary); default: no "
        "draft-model runs",
    )
    parser.add_argument(
        "--mtp-path",
        default=None,
        metavar="DIR",
        help="a model with an MTP head for the MTP runs (default: the synthetic "
        f"{'-'.join(models.MTP_MODEL)} one, or none with --model-path)",
    )
    parser.add_argument(
        "--mtp-model",
        default=None,
        help="synthetic models with an MTP head to measure, comma-separated, of "
        f"{', '.join(models.MTP_MODELS)} (default: {'-'.join(models.MTP_MODEL)}; with "
        "--smoke qwen3_next-tiny)",
    )
    parser.add_argument(
        "--mtp-draft-tokens",
        default=None,
        help="values of k of the MTP head steered to each --acceptance (default: "
        f"{','.join(map(str, MTP_DRAFT_TOKENS))}; with --smoke the --num-draft-tokens "
        "values); the unsteered head runs at --num-draft-tokens",
    )
    parser.add_argument("--no-draft", action="store_true", help="skip the draft-model runs")
    parser.add_argument("--no-mtp", action="store_true", help="skip the MTP-head model")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="where synthetic models are written (default: the mtp-splitk cache, "
        f"{models.default_root()})",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help=f"tokens per run {default('max_tokens')}"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"runs per measurement, the median kept {default('repeats')}",
    )
    parser.add_argument(
        "--acceptance",
        default=None,
        help=f"acceptance rates of the controlled drafter {default('acceptance')}",
    )
    parser.add_argument(
        "--num-draft-tokens", default=None, help=f"values of k {default('num_draft_tokens')}"
    )
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        help="speculative loops to measure: overlap (no host sync per step), compiled "
        "(overlap, the target's part of a step through mx.compile), sync "
        "(the synchronous loop), every=N (synchronous, submitted every N decoder layers) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after which remaining measurements are skipped (default: none)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every task once on tiny models, few tokens, in seconds on a CPU: checks the "
        "harness, no speed claims",
    )


def _settings(args) -> Dict:
    """The run's numbers: the flags given, else --smoke's or the full defaults."""
    base = SMOKE if args.smoke else DEFAULTS
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    acceptances = [float(v) for v in str(values["acceptance"]).split(",")]
    draft_tokens = [int(v) for v in str(values["num_draft_tokens"]).split(",")]
    if not all(0.0 <= p <= 1.0 for p in acceptances) or not all(k >= 1 for k in draft_tokens):
        raise ValueError(
            "--acceptance values must be in [0, 1] and --num-draft-tokens values >= 1."
        )
    if values["max_tokens"] < 1 or values["repeats"] < 1:
        raise ValueError("--max-tokens and --repeats must be 1 or more.")
    mtp_tokens = getattr(args, "mtp_draft_tokens", None)
    if mtp_tokens is None:
        mtp_tokens = draft_tokens if args.smoke else MTP_DRAFT_TOKENS
    else:
        mtp_tokens = [int(v) for v in str(mtp_tokens).split(",")]
    if not all(k >= 1 for k in mtp_tokens):
        raise ValueError("--mtp-draft-tokens values must be >= 1.")
    return dict(
        values,
        acceptance=acceptances,
        num_draft_tokens=draft_tokens,
        mtp_draft_tokens=list(mtp_tokens),
    )


def _mtp_names(args) -> List[str]:
    """The --mtp-model names (checked), or the default for the run."""
    if args.mtp_model is None:
        return ["qwen3_next-tiny" if args.smoke else "-".join(models.MTP_MODEL)]
    names = [n for n in args.mtp_model.split(",") if n]
    unknown = [n for n in names if n not in models.MTP_MODELS]
    if unknown:
        raise ValueError(
            f"unknown MTP model(s) {unknown}; expected some of {list(models.MTP_MODELS)}."
        )
    return names


def _synthetic_jobs(names, root, no_draft) -> List[Tuple[str, Path, Optional[Path]]]:
    """(name, target, draft) of the synthetic models, written first where missing,
    after a line saying how much disk they take (refused if it is not free)."""
    specs = []
    for n in names:
        family, size, draft_family, draft_size = models.MODELS[n]
        specs.append((family, size, False))
        if not no_draft:
            specs.append((draft_family, draft_size, False))
    models.check_disk(root, specs)
    jobs = []
    for n in names:
        family, size, draft_family, draft_size = models.MODELS[n]
        target = models.model_dir(
            root, family, size, progress=ByteProgress(f"  writing {family} {size}")
        )
        draft = None
        if not no_draft:
            progress = ByteProgress(f"  writing {draft_family} {draft_size}")
            draft = models.model_dir(root, draft_family, draft_size, progress=progress)
        jobs.append((n, target, draft))
    return jobs


def run(args) -> Dict:
    """Run the benchmark for parsed ``args``; returns the results document."""
    settings = _settings(args)
    loops = tuple(v for v in args.loops.split(",") if v)
    for loop in loops:
        loop_options(loop)  # one clear error for a bad value
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in models.MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected some of {list(models.MODELS)}.")
    mtp_names = _mtp_names(args)
    if args.draft_path and not args.model_path:
        raise ValueError("--draft-path is the draft of --model-path; give both.")
    for flag in ("model_path", "draft_path", "mtp_path"):
        if getattr(args, flag) is not None:
            check_model_path(getattr(args, flag), f"--{flag.replace('_', '-')}")
    root = Path(args.model_dir) if args.model_dir else models.default_root()
    deadline = Deadline(args.deadline)
    meta = device_meta()
    meta.update(
        max_tokens=settings["max_tokens"],
        repeats=settings["repeats"],
        host_probe=[host_probe()],  # again at the end: a host that slows mid-run shows
    )
    results = Results(Path(args.out), meta, "bench_e2e", report.e2e_markdown)

    if args.model_path:
        draft = None if args.no_draft else args.draft_path
        jobs = [(Path(args.model_path).resolve().name, Path(args.model_path), draft)]
        verify_ms = VERIFY_MS
    elif args.smoke:
        target, draft = models.smoke_pair(root)
        jobs = [("tiny-llama", target, None if args.no_draft else draft)]
        verify_ms = (1, 3, 5)
    else:
        jobs = _synthetic_jobs(names, root, args.no_draft)
        verify_ms = VERIFY_MS
    mtp_jobs = []  # (name, directory)
    if args.mtp_path:
        mtp_jobs = [(Path(args.mtp_path).resolve().name, Path(args.mtp_path))]
    elif not args.no_mtp and (args.mtp_model is not None or not args.model_path):
        if not args.smoke:
            models.check_disk(root, [models.mtp_spec(n) for n in mtp_names])
        for n in mtp_names:
            progress = ByteProgress(f"  writing {n} + MTP")
            mtp_jobs.append((n, models.mtp_model_dir(root, n, progress=progress)))
    if args.no_mtp:
        mtp_jobs = []

    common = dict(
        max_tokens=settings["max_tokens"],
        repeats=settings["repeats"],
        draft_tokens=settings["num_draft_tokens"],
        loops=loops,
    )
    heads, rests = [], []
    for name, target, draft in jobs:
        head, rest = model_tasks(
            name,
            target,
            results,
            acceptances=settings["acceptance"],
            draft_path=draft,
            verify_ms=verify_ms,
            **common,
        )
        heads += head
        rests += rest
    tasks = heads + rests
    for mtp_name, mtp_path in mtp_jobs:
        tasks += mtp_tasks(
            f"{mtp_name}-mtp",
            mtp_path,
            results,
            acceptances=settings["acceptance"],
            mtp_draft_tokens=settings["mtp_draft_tokens"],
            **common,
        )

    progress = Progress(len(tasks))
    for message, task in tasks:
        if not progress.step(deadline, message):
            break
        task()
    results.doc["meta"]["complete"] = progress.done == len(tasks)
    results.doc["meta"]["host_probe"].append(host_probe())
    results.save()
    progress.finish()
    out = results.out.resolve()
    print(f"Results: {out / 'bench_e2e.json'} and {out / 'bench_e2e.md'}", flush=True)
    return results.doc
