# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk train-mtp``: train an MTP head for a model that has none.

Register with ``train_mtp.add_parser(subparsers)``; the parser's ``func`` is
:func:`main`. The trainer is :mod:`mtp_splitk.mtp.train`.
"""

import argparse

from ..mtp.train import TrainConfig, train
from . import PROG, Parser, check_model_path

DEFAULTS = TrainConfig(model="", out="")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DEFAULTS
    parser.add_argument("--model", required=True, help="target model: path or HF repo")
    parser.add_argument(
        "--out",
        required=True,
        help="output model directory (the target's files linked, the head in "
        "mtp.safetensors, training state in train_state/); rerun to continue",
    )
    cost = parser.add_argument_group("cost (defaults suit a GPU)")
    cost.add_argument(
        "--prompts",
        type=int,
        default=d.prompts,
        help="training prompts, one sampled continuation each",
    )
    cost.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help="generated tokens per sequence",
    )
    cost.add_argument(
        "--gen-batch",
        type=int,
        default=d.gen_batch,
        help="sequences generated together",
    )
    cost.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="sequences per training step",
    )
    cost.add_argument(
        "--steps", type=int, default=d.steps, help="training steps in all"
    )
    cost.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        help="wall-clock budget of this run (generation, training, evaluation); "
        "the learning-rate schedule then also ends with the budget",
    )
    cost.add_argument(
        "--gen-fraction",
        type=float,
        default=d.gen_fraction,
        help="with --minutes: the most of it spent generating text",
    )
    cost.add_argument(
        "--stop-after", type=int, default=None, help="run this many steps, save, stop"
    )
    cost.add_argument(
        "--eval-prompts",
        type=int,
        default=d.eval_prompts,
        help="held-out prompts for the acceptance figure (greedy continuations)",
    )
    cost.add_argument(
        "--eval-tokens", type=int, default=d.eval_tokens, help="tokens per held-out one"
    )
    fit = parser.add_argument_group("training")
    fit.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    fit.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps")
    fit.add_argument(
        "--temperature", type=float, default=d.temperature, help="sampling temperature"
    )
    fit.add_argument(
        "--depth",
        type=int,
        default=d.depth,
        help="head steps unrolled on its own output in the loss (later drafts)",
    )
    fit.add_argument(
        "--top-k",
        type=int,
        default=d.top_k,
        help="cache the target's hidden states and top-k logits once and fit those "
        "(no target pass per step); 0: run the target every step, whole vocabulary",
    )
    fit.add_argument(
        "--hidden-weight",
        type=float,
        default=d.hidden_weight,
        help="weight of the pull towards the target's next hidden state",
    )
    fit.add_argument(
        "--init",
        choices=["identity", "last-layer", "random"],
        default=d.init,
        help="identity: start as the target's own next-token prediction (its last "
        "layer, silenced); last-layer: that layer as it is; random",
    )
    fit.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from the head in this model directory's mtp.safetensors (e.g. an "
        "earlier --out) instead of --init; the data and optimizer start afresh",
    )
    fit.add_argument("--seed", type=int, default=d.seed)
    fit.add_argument("--log-every", type=int, default=d.log_every)
    fit.add_argument("--save-every", type=int, default=d.save_every)
    return parser


def setup_arg_parser() -> Parser:
    parser = Parser(
        prog=f"{PROG} train-mtp",
        description="Fit a one-block MTP head (DeepSeek-V3 layout over the target's "
        "own decoder block) to the target's next-next-token predictions on text the "
        "target writes itself; progress on stderr, the output directory on stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return add_arguments(parser)


def config_from(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv=None) -> int:
    cfg = config_from(setup_arg_parser().parse_args(argv))
    for name in ("prompts", "max_tokens", "gen_batch", "batch_size", "eval_prompts"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.depth < 1 or cfg.steps < 0 or cfg.top_k < 0:
        raise ValueError("--depth must be at least 1, --steps and --top-k at least 0")
    if cfg.init_from is not None:
        check_model_path(cfg.init_from, "--init-from")
    train(cfg)
    print(cfg.out)
    return 0
