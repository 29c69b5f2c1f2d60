# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk generate``: ``mlx_lm.generate`` with the patch enabled.

It takes every flag of mlx-lm's own parser (built by mlx-lm's
``setup_arg_parser``, so the flags stay in sync) and runs mlx-lm's own
``main``, plus

- ``--split-k auto|off|N``: the planner's split policy (``plan.set_split``);
- ``--stats``: speculation statistics after the text (:mod:`.stats`);
- ``--mtp``: draft with the model's own MTP head (``mtp_splitk.mtp.generate_step``)
  instead of a draft model.

Without ``--model`` it builds (once, into the cache, :mod:`mtp_splitk.cache`)
a tiny synthetic target and a draft for it and decodes speculatively, so it
runs on a fresh machine with no download; with ``--mtp``, a tiny synthetic
target with an MTP head instead.
"""

import argparse
import contextlib
import functools
import importlib
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx_lm
import transformers
from mlx_lm.generate import setup_arg_parser as mlx_lm_arg_parser

from .. import cache, mtp, patch, plan, synthetic
from ..mtp.loading import _without_mtp
from ..speculative import Stats
from . import PROG, Parser, UsageError, check_model_path
from .stats import Recorder, timed_calls

# The family of the --mtp demo target: a hybrid (Gated DeltaNet) model, which
# mlx-lm's own speculative loop refuses, and whose tiny MTP model loads in
# milliseconds (the family examples/mtp_generate.py uses too).
MTP_FAMILY = "qwen3_next"


def parse_split_k(value: str) -> Optional[int]:
    """``auto`` -> None, ``off`` -> 0, ``N`` -> N (the values plan.set_split takes)."""
    text = value.strip().lower()
    if text == "auto":
        return None
    if text == "off":
        return 0
    choices = ", ".join(map(str, plan.WARP_CHOICES))
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n != 0 and n not in plan.WARP_CHOICES:
        raise argparse.ArgumentTypeError(f"expected auto, off or one of {choices}; got {value!r}")
    return n


# -- the demo models ------------------------------------------------------------------------


def _demo(name: str, write: Callable[[Path], object], marker: str) -> Path:
    """``cache.root()/name-<digest>``, built by ``write(path)`` on first use.

    The digest covers the versions that decide the bytes written (the
    generator's and mlx-lm's and transformers' formats), so an upgrade
    builds afresh instead of loading a stale model.
    """
    key = cache.digest(synthetic.FORMAT_VERSION, mlx_lm.__version__, transformers.__version__)
    final = cache.root() / f"{name}-{key}"
    if not cache.is_built(final, marker):
        print(
            f"[{PROG}] building the synthetic demo models in {final} (first run only)",
            file=sys.stderr,
            flush=True,
        )
        tic = time.perf_counter()
        cache.build_once(final, write, marker)
        print(
            f"[{PROG}] built in {time.perf_counter() - tic:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    return final


def default_models() -> Tuple[Path, Path]:
    """The tiny synthetic (target, draft) pair, built on first use."""
    final = _demo(
        "tiny-pair-llama",
        lambda path: synthetic.write_pair(path, "llama"),
        marker="draft/config.json",
    )
    return final / "target", final / "draft"


def default_mtp_model() -> Path:
    """The tiny synthetic target with an MTP head, built on first use.

    Its MTP tensors sit in the target's shards, as in a Hugging Face
    checkpoint. (``synthetic.FORMAT_VERSION`` in the cache key stands for
    the MTP writer's bytes too.)
    """
    return _demo(
        f"tiny-mtp-{MTP_FAMILY}",
        lambda path: synthetic.write_mtp_model(path, MTP_FAMILY),
        marker="config.json",
    )


# -- mlx-lm's main, hooked ------------------------------------------------------------------


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
    mlx_utils = importlib.import_module("mlx_lm.utils")
    load, heads = mlx_generate.load, []

    def load_with_head(path_or_hf_repo, *args, **kwargs):
        load_model = functools.partial(mlx_utils.load_model, get_model_classes=_without_mtp())
        with _replaced(mlx_utils, load_model=load_model):
            loaded = load(path_or_hf_repo, *args, **kwargs)
        heads.append(mtp.head_for(loaded[0], path_or_hf_repo))
        return loaded

    def step(prompt, model, _draft_model, stream, **kwargs):
        # Looked up now, not bound at import: tests swap it.
        return mtp.generate_step(
            prompt, model, stream=stream, head=heads[-1], stats=stats, **kwargs
        )

    return {"load": load_with_head, "speculative_generate_step": step}


def run(args) -> int:
    """mlx-lm's own ``main`` under the patch, so every flag keeps mlx-lm's
    meaning (chat templates, prompt cache files, images, KV quantization, the
    draft-model check). Module attributes are swapped while it runs: its
    parser (the arguments come parsed, with the defaults filled in), its
    ``stream_generate`` (recorded for --stats) and, with --mtp, its ``load``
    and the step function of its speculative branch (:func:`_mtp_hooks`)."""
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

    recorder = Recorder(loop=Stats()) if args.mtp else Recorder()
    stream_generate = mlx_generate.stream_generate

    def recording_stream_generate(model, tokenizer, prompt, *rest, draft_model=None, **kwargs):
        if args.mtp:
            # mlx-lm's stream_generate takes its speculative branch only for
            # a draft model; the target stands in for one and the branch's
            # step function is swapped for the MTP one below.
            draft_model = model
        timing = draft_model is not None and not args.mtp and args.stats
        with timed_calls(model, recorder.calls) if timing else contextlib.nullcontext():
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


def setup_arg_parser() -> Parser:
    parser = Parser(
        prog=f"{PROG} generate",
        parents=[mlx_lm_arg_parser()],  # every mlx_lm.generate flag, as mlx-lm defines it
        add_help=False,
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
    return parser


def main(argv=None) -> int:
    return run(setup_arg_parser().parse_args(argv))
