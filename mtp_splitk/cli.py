# Copyright © 2026 mtp_splitk contributors

"""The ``mtp-splitk`` command.

``mtp-splitk generate`` is ``mlx_lm.generate`` with the patch enabled: it
takes every flag of mlx-lm's own parser (built by mlx-lm's
``setup_arg_parser``, so the flags stay in sync) and runs mlx-lm's own
``main``, plus

- ``--split-k auto|off|N``: the planner's split policy (``plan.set_split``);
- ``--stats``: speculation statistics after the text;
- ``--mtp``: draft with the model's own MTP head (``mtp_splitk.mtp.generate_step``)
  instead of a draft model.

Without ``--model`` it builds (once, into a cache directory) a tiny
synthetic target and a draft for it and decodes speculatively, so it runs on
a fresh machine with no download; with ``--mtp``, a tiny synthetic target
with an MTP head instead.

``mtp-splitk convert`` is ``mlx_lm.convert`` keeping (and quantizing) the
checkpoint's MTP head (``mtp_splitk.mtp.convert``).

``mtp-splitk synthesize`` writes a synthetic model directory of any family
and size (real shapes for the GPU) with progress on stderr.

Bad input ends with one ``mtp-splitk: error: ...`` line on stderr and exit
status 2.
"""

import argparse
import contextlib
import functools
import hashlib
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

PROG = "mtp-splitk"
CACHE_ENV = "MTP_SPLITK_CACHE"


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (argparse prints the usage too)."""

    def error(self, message):
        command = self.prog.split()[1:]  # "mtp-splitk generate" -> ["generate"]
        raise UsageError(f"{' '.join(command)}: {message}" if command else message)


# -- --split-k ------------------------------------------------------------------------------


def parse_split_k(value: str) -> Optional[int]:
    """``auto`` -> None, ``off`` -> 0, ``N`` -> N (the values plan.set_split takes)."""
    from .plan import WARP_CHOICES

    text = value.strip().lower()
    if text == "auto":
        return None
    if text == "off":
        return 0
    choices = ", ".join(map(str, WARP_CHOICES))
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n != 0 and n not in WARP_CHOICES:
        raise argparse.ArgumentTypeError(
            f"expected auto, off or one of {choices}; got {value!r}"
        )
    return n


# -- default models -------------------------------------------------------------------------


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "mtp_splitk"


def _build_once(name: str, write: Callable[[Path], object], marker: str) -> Path:
    """``cache_dir()/name-<digest>``, written by ``write(path)`` on first use.

    The digest covers the versions that decide the bytes written (the
    generator's and mlx-lm's and transformers' formats), so an upgrade
    builds afresh instead of loading a stale model. ``write`` fills a
    temporary directory that is then renamed into place: an interrupted
    build leaves nothing behind and concurrent builds cannot see half a
    model. ``marker`` (a file ``write`` creates) says the build is there.
    """
    import mlx_lm
    import transformers

    from . import synthetic

    key = f"{synthetic.FORMAT_VERSION}/{mlx_lm.__version__}/{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    final = cache_dir() / f"{name}-{digest}"
    if not (final / marker).exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        print(
            f"[{PROG}] building the synthetic demo models in {final} (first run only)",
            file=sys.stderr,
            flush=True,
        )
        tic = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
        try:
            write(work)
            try:
                os.rename(work, final)
            except OSError:
                if not (final / marker).exists():
                    raise  # not the "another process was faster" case
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(
            f"[{PROG}] built in {time.perf_counter() - tic:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    return final


def default_models() -> Tuple[Path, Path]:
    """The tiny synthetic (target, draft) pair, built on first use."""
    from . import synthetic

    final = _build_once(
        "tiny-pair-llama",
        lambda path: synthetic.write_pair(path, "llama"),
        marker="draft/config.json",
    )
    return final / "target", final / "draft"


# The family of the --mtp demo target: a hybrid (Gated DeltaNet) model, which
# mlx-lm's own speculative loop refuses, and whose tiny MTP model loads in
# milliseconds (the family examples/mtp_generate.py uses too).
MTP_FAMILY = "qwen3_next"


def default_mtp_model() -> Path:
    """The tiny synthetic target with an MTP head, built on first use.

    Its MTP tensors sit in the target's shards, as in a Hugging Face
    checkpoint. (``synthetic.FORMAT_VERSION`` in the cache key stands for
    ``mtp_splitk.mtp.synthetic``'s bytes too.)
    """
    from .mtp.synthetic import write_mtp_model

    return _build_once(
        f"tiny-mtp-{MTP_FAMILY}",
        lambda path: write_mtp_model(path, MTP_FAMILY),
        marker="config.json",
    )


_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(value: str, flag: str) -> None:
    """A local model must be a directory with config.json; anything that is
    not a local path but looks like ``org/name`` is left to mlx-lm (a Hub
    repository)."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {value}: not a model directory (no config.json)")
    elif not _HF_REPO.match(value):
        raise UsageError(f"{flag} {value}: model directory not found")


# -- statistics -----------------------------------------------------------------------------


@dataclass
class Recorder:
    """What ``--stats`` observes of one mlx-lm generation.

    ``from_draft`` comes from mlx-lm's responses. ``calls`` are the target's
    forward passes as (rows, seconds): with a draft model each is timed
    synchronously (the drafts are evaluated first, the logits after), so a
    verify time is the target's M = k+1 forward alone.

    With ``--mtp`` the loop runs the target as backbone + LM head (the head
    needs its hidden states), never through ``model.__call__``, so there are
    no calls to time; ``loop`` (the loop's own ``speculative.Stats``) gives
    the steps, the drafts and the verify time instead. Its verify time is
    synchronised the same way, but it is a total: a mean, no median.
    """

    from_draft: List[bool] = field(default_factory=list)
    calls: List[Tuple[int, float]] = field(default_factory=list)
    loop: Optional[Any] = None  # mtp_splitk.speculative.Stats, with --mtp
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0

    def add(self, response) -> None:
        self.from_draft.append(bool(response.from_draft))
        self.prompt_tokens = response.prompt_tokens
        self.prompt_tps = response.prompt_tps
        self.generation_tokens = response.generation_tokens
        self.generation_tps = response.generation_tps

    def verify_calls(self) -> List[Tuple[int, float]]:
        """The target calls after the prompt: mlx-lm's speculative loop first
        prefills all prompt tokens but the last, then verifies once per step."""
        prefill = max(self.prompt_tokens - 1, 0)
        done = 0
        for i, (rows, _) in enumerate(self.calls):
            if done >= prefill:
                return self.calls[i:]
            done += rows
        return []

    def accepted_per_step(self) -> List[int]:
        """Each step yields its accepted drafts, then one token of the target's."""
        steps, run = [], 0
        for from_draft in self.from_draft:
            if from_draft:
                run += 1
            else:
                steps.append(run)
                run = 0
        if run:
            steps.append(run)  # stopped (eos or max tokens) inside a step
        return steps

    def summary(self, speculative: bool) -> str:
        lines = [
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {self.generation_tokens} tokens, "
            f"{self.generation_tps:.3f} tokens-per-sec",
        ]
        if not speculative:
            lines.append("Speculation: none (no draft model): 1 token per target step")
            return "\n".join(f"[stats] {line}" for line in lines)
        accepted = self.accepted_per_step()
        n_accepted = sum(self.from_draft)
        if self.loop is not None:
            verify = []
            steps, drafted = self.loop.steps, self.loop.drafted
        else:
            verify = self.verify_calls()
            steps = len(verify) or len(accepted)
            drafted = sum(rows - 1 for rows, _ in verify)
        rate = n_accepted / drafted if drafted else 0.0
        lines.append(
            f"Speculation: {steps} steps, {drafted} drafted, {n_accepted} accepted "
            f"(acceptance rate {rate:.1%}), "
            f"{len(self.from_draft) / steps if steps else 0:.2f} tokens/step"
        )
        histogram = " ".join(
            f"{n}:{accepted.count(n)}" for n in range(max(accepted, default=0) + 1)
        )
        lines.append(f"Accepted drafts per step (drafts:steps): {histogram}")
        if verify:
            times = [1e3 * seconds for _, seconds in verify]
            rows = statistics.median(r for r, _ in verify)
            lines.append(
                f"Verify step: {statistics.mean(times):.2f} ms mean, "
                f"{statistics.median(times):.2f} ms median ({rows:g} rows)"
            )
        elif self.loop is not None and self.loop.steps:
            lines.append(
                f"Verify step: {1e3 * self.loop.mean_verify_time:.2f} ms mean "
                f"({self.loop.verify_rows / self.loop.steps:.2f} rows mean; "
                "timed by the MTP loop, which keeps no median)"
            )
        return "\n".join(f"[stats] {line}" for line in lines)


@contextlib.contextmanager
def _timed_calls(model, calls: List[Tuple[int, float]]):
    """Time each forward pass of ``model`` (this instance only) synchronously.

    The model's class is swapped for a subclass whose __call__ waits for its
    inputs (the drafts), runs the original and waits for the logits.
    """
    import mlx.core as mx

    cls = type(model)

    def __call__(self, inputs, *args, **kwargs):
        mx.eval(inputs)
        tic = time.perf_counter()
        out = cls.__call__(self, inputs, *args, **kwargs)
        mx.eval(out)
        calls.append((inputs.shape[-1], time.perf_counter() - tic))
        return out

    model.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
    try:
        yield
    finally:
        model.__class__ = cls


@contextlib.contextmanager
def _replaced(module, **attributes):
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# -- generate -------------------------------------------------------------------------------


def _mtp_hooks(mlx_generate, stats) -> dict:
    """With --mtp: mlx-lm's ``load`` and speculative step function, swapped.

    ``main`` loads the model it settled on (``--model`` or the one a prompt
    cache file names); the MTP head is read from the same checkpoint right
    after, so a model without MTP weights fails before any prompt is
    processed. The target loads with the MTP loader's class lookup, whose
    sanitize drops every MTP key: mlx-lm's keeps them in some checkpoints
    (Qwen3-Next's converted ones, DeepSeek-V3-shaped ones not 61 layers
    deep) and its strict load would refuse them.
    """
    from . import mtp
    from .mtp.loading import _without_mtp

    mlx_utils = importlib.import_module("mlx_lm.utils")
    load, heads = mlx_generate.load, []

    def load_with_head(path_or_hf_repo, *args, **kwargs):
        load_model = functools.partial(
            mlx_utils.load_model, get_model_classes=_without_mtp()
        )
        with _replaced(mlx_utils, load_model=load_model):
            loaded = load(path_or_hf_repo, *args, **kwargs)
        heads.append(mtp.head_for(loaded[0], path_or_hf_repo))
        return loaded

    def step(prompt, model, _draft_model, stream, **kwargs):
        # Looked up now, not imported above: tests swap it.
        return mtp.generate_step(
            prompt, model, stream=stream, head=heads[-1], stats=stats, **kwargs
        )

    return {"load": load_with_head, "speculative_generate_step": step}


def run_generate(args) -> int:
    """mlx-lm's own ``main`` under the patch, so every flag keeps mlx-lm's
    meaning (chat templates, prompt cache files, images, KV quantization, the
    draft-model check). Module attributes are swapped while it runs: its
    parser (the arguments come parsed, with the defaults filled in), its
    ``stream_generate`` (recorded for --stats) and, with --mtp, its ``load``
    and the step function of its speculative branch (:func:`_mtp_hooks`)."""
    from . import patch, plan

    # The module, not the function of the same name that mlx_lm exports.
    mlx_generate = importlib.import_module("mlx_lm.generate")

    if args.mtp and args.draft_model is not None:
        raise UsageError("--mtp and --draft-model are alternatives; give one")
    # A prompt cache file names its model; mlx-lm takes that one.
    if args.model is None and args.prompt_cache_file is None:
        if args.mtp:
            args.model = str(default_mtp_model())
        else:
            args.model, draft = (str(p) for p in default_models())
            if args.draft_model is None:
                args.draft_model = draft
    if args.model is not None:
        check_model_path(args.model, "--model")
    if args.draft_model is not None:
        check_model_path(args.draft_model, "--draft-model")

    if args.mtp:
        from .speculative import Stats

        recorder = Recorder(loop=Stats())
    else:
        recorder = Recorder()
    stream_generate = mlx_generate.stream_generate

    def recording_stream_generate(
        model, tokenizer, prompt, *rest, draft_model=None, **kwargs
    ):
        if args.mtp:
            # mlx-lm's stream_generate takes its speculative branch only for
            # a draft model; the target stands in for one and the branch's
            # step function is swapped for the MTP one below.
            draft_model = model
        timing = draft_model is not None and not args.mtp and args.stats
        with _timed_calls(model, recorder.calls) if timing else contextlib.nullcontext():
            for response in stream_generate(
                model, tokenizer, prompt, *rest, draft_model=draft_model, **kwargs
            ):
                recorder.add(response)
                yield response

    hooks = {
        # mlx-lm's main() builds its parser and parses sys.argv; it gets the
        # arguments already parsed (and completed) here instead.
        "setup_arg_parser": lambda: argparse.Namespace(parse_args=lambda: args),
        "stream_generate": recording_stream_generate,
    }
    if args.mtp:
        hooks.update(_mtp_hooks(mlx_generate, recorder.loop))

    previous_split = plan.forced_split()
    plan.set_split(args.split_k)
    try:
        with patch.enabled(), _replaced(mlx_generate, **hooks):
            mlx_generate.main()
    finally:
        plan.set_split(previous_split)
    if args.stats:
        print(recorder.summary(speculative=args.draft_model is not None or args.mtp))
    return 0


def add_generate_parser(subparsers) -> None:
    from mlx_lm.generate import setup_arg_parser

    parser = subparsers.add_parser(
        "generate",
        parents=[setup_arg_parser()],  # every mlx_lm.generate flag, as mlx-lm defines it
        add_help=False,
        help="mlx_lm.generate with the split-K patch (all of its flags, plus the ones below)",
        description=(
            "mlx_lm.generate with mtp_splitk's quantized matmuls. Without --model a tiny "
            "synthetic target and draft are built (once) and decoded speculatively."
        ),
    )
    group = parser.add_argument_group("mtp-splitk")
    group.add_argument(
        "--split-k",
        type=parse_split_k,
        default=None,
        metavar="auto|off|N",
        help="split-K policy: auto (tuned table), off (MLX's kernels), or N warps along K",
    )
    group.add_argument(
        "--stats",
        action="store_true",
        help="print accepted tokens per step, acceptance rate, verify-step time and "
        "prompt / generation tokens-per-sec (times each verify pass synchronously; "
        "with --mtp the loop's own timing, a mean)",
    )
    group.add_argument(
        "--mtp",
        action="store_true",
        help="draft with the model's multi-token-prediction head instead of a draft "
        "model (without --model: a tiny synthetic target with one)",
    )
    parser.set_defaults(func=run_generate)


# -- convert --------------------------------------------------------------------------------


def run_convert(args) -> int:
    from . import mtp

    # A missing local directory would otherwise be taken for a Hub repository
    # and fail in the download.
    check_model_path(args.hf_path, "--hf-path")
    print(mtp.convert_main(args))
    return 0


def add_convert_parser(subparsers) -> None:
    from . import mtp

    parser = subparsers.add_parser(
        "convert",
        help="mlx_lm.convert keeping the checkpoint's MTP head (all of its flags "
        "but --dequantize)",
        description=(
            "Convert a Hugging Face checkpoint with mlx_lm.convert and keep its MTP "
            "head, cast and quantized like the target, in mtp.safetensors (stock "
            "mlx_lm.load still loads the target; generate --mtp uses the head)."
        ),
    )
    mtp.add_convert_args(parser)
    parser.set_defaults(func=run_convert)


# -- synthesize -----------------------------------------------------------------------------


class _Progress:
    """Bytes written so far, on stderr: one updating line on a terminal, a
    line per 10% otherwise."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = -1
        self.tic = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        step = percent if self.tty else percent // 10 * 10
        if step == self.shown:
            return
        self.shown = step
        unit, scale = ("GiB", 2**30) if total >= 2**30 else ("MiB", 2**20)
        text = (
            f"{self.label}: {done / scale:.2f} / {total / scale:.2f} {unit} "
            f"({percent}%, {time.perf_counter() - self.tic:.0f} s)"
        )
        end = "\n" if not self.tty or done >= total else ""
        print(("\r" if self.tty else "") + text, end=end, file=self.stream, flush=True)


def run_synthesize(args) -> int:
    from . import synthetic

    path = Path(args.path)
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"{args.path}: exists and is not empty")
    quantization = None
    if not args.no_quantize:
        quantization = {"bits": args.bits, "group_size": args.group_size, "mode": args.mode}
    synthetic.write_model(
        path,
        args.family,
        args.size,
        quantization,
        seed=args.seed,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
        progress=_Progress(f"[{PROG}] writing {args.family} {args.size}"),
    )
    print(path)
    return 0


def add_synthesize_parser(subparsers) -> None:
    from . import synthetic

    parser = subparsers.add_parser(
        "synthesize",
        help="write a synthetic mlx-lm model directory (random weights, real layout)",
        description="Write a synthetic mlx-lm model directory that mlx_lm.load reads.",
    )
    parser.add_argument("path", help="an empty or missing directory")
    parser.add_argument("--family", required=True, choices=synthetic.FAMILIES)
    parser.add_argument(
        "--size",
        default="tiny",
        help=f"tiny, small or a real shape: {', '.join(synthetic.SIZES)}",
    )
    parser.add_argument("--bits", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument(
        "--mode", default="affine", choices=["affine", "mxfp4", "mxfp8", "nvfp4"]
    )
    parser.add_argument("--no-quantize", action="store_true", help="write float weights")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"]
    )
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_synthesize)


# -- bench --------------------------------------------------------------------------------


def add_bench_parser(subparsers) -> None:
    from . import bench_e2e

    parser = subparsers.add_parser("bench", help="benchmarks")
    kinds = parser.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    e2e = kinds.add_parser(
        "e2e",
        help="tokens/s of plain and speculative decoding, unpatched vs patched",
        description=bench_e2e.__doc__.splitlines()[0],
    )
    bench_e2e.add_arguments(e2e)
    e2e.set_defaults(func=lambda args: bench_e2e.run(args) and 0)


# -- entry point ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Split-K quantized matmuls and MTP decoding for mlx-lm."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_generate_parser(subparsers)
    add_convert_parser(subparsers)
    add_synthesize_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, OSError) as e:
        # Bad input (a flag, a path, a model that does not fit) is one line,
        # never a traceback. ValueError and OSError are how mlx-lm reports
        # missing files, mismatched draft tokenizers and bad configs.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
