# Copyright © 2026 mtp_splitk contributors

"""Generate with and without multi-token prediction and compare.

    python examples/mtp_generate.py                       # tiny synthetic Qwen3-Next
    python examples/mtp_generate.py --family deepseek_v3  # other layouts
    python examples/mtp_generate.py --model path/to/converted-with-mtp
    python examples/mtp_generate.py --acceptance 0.7      # a known acceptance rate

Without ``--model`` a tiny synthetic model with random MTP weights is written
to a temporary directory, removed at exit. Its MTP head is random, so nearly every draft is
rejected; ``--acceptance`` swaps in the acceptance-controlled drafter (the
target's recorded greedy continuation, each token kept with that
probability) to show the loop at a given acceptance rate. At temperature 0
the output should equal plain decoding token for token; the script checks
and explains a difference (a near-tie rounded differently, see --float32).

The same decoding with every ``mlx_lm.generate`` flag (chat template,
sampling, prompt cache files) is ``mtp-splitk generate --mtp [--model PATH]``;
``mtp-splitk convert`` makes such a PATH from a Hugging Face checkpoint.

Bad input ends with one ``mtp_generate.py: error: ...`` line and exit status 2.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.sample_utils import make_sampler

from mtp_splitk import mtp
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.commands import UsageError, check_model_path
from mtp_splitk.mtp import MTPDrafter
from mtp_splitk.speculative import Stats, make_distribution, stream_generate


PROG = "mtp_generate.py"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="A model directory with MTP weights.")
    parser.add_argument(
        "--family",
        default="qwen3_next",
        choices=["deepseek_v3", "qwen3_next", "qwen3_5", "mimo"],
        help="Synthetic model family when --model is not given.",
    )
    parser.add_argument("--prompt", default="Speculative decoding drafts a few tokens")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float32", action="store_true", help="Compute in float32.")
    parser.add_argument(
        "--acceptance",
        type=float,
        default=None,
        help="Draft with the acceptance-controlled drafter at this rate.",
    )
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        raise UsageError(f"argument --max-tokens: expected 1 or more; got {args.max_tokens}")
    if args.num_draft_tokens < 0:
        raise UsageError(
            f"argument --num-draft-tokens: expected 0 or more; got {args.num_draft_tokens}"
        )
    if args.temp < 0:
        raise UsageError(f"argument --temp: expected 0 or more; got {args.temp}")
    if args.acceptance is not None and not 0 <= args.acceptance <= 1:
        raise UsageError(f"argument --acceptance: expected a rate in [0, 1]; got {args.acceptance}")
    if args.model is not None:
        check_model_path(args.model, "--model")
    return args


def run(responses):
    """Drain a stream of GenerationResponse: (responses, text)."""
    out = list(responses)
    return out, "".join(r.text for r in out)


def compare(plain, spec):
    """Greedy speculative decoding must reproduce plain decoding; report
    where it does not, and how close the target's top two tokens were."""
    for i, (a, b) in enumerate(zip(plain, spec)):
        if a.token != b.token:
            top2 = mx.sort(a.logprobs)[-2:].tolist()
            print(
                f"Greedy output differs from plain decoding at token {i}: the "
                f"target's top two logprobs there were {top2[1]:.4f} and "
                f"{top2[0]:.4f}. A near-tie like this flips when a verify row "
                "and a decode row round differently (mlx-lm's DeepSeek-V3 "
                "attention takes another path for several rows; try --float32)."
            )
            return False
    print("Greedy output identical to plain decoding: True")
    return True


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        with tempfile.TemporaryDirectory(prefix="mtp_generate-") as tmp:
            if args.model is None:
                from mtp_splitk.synthetic import write_mtp_model

                path = Path(tmp) / args.family
                print(f"[INFO] Writing a tiny synthetic {args.family} with MTP weights to {path}")
                write_mtp_model(path, args.family, seed=args.seed)
            else:
                path = args.model
            generate(args, *mtp.load(path))
    except (UsageError, ValueError, OSError) as e:
        # A path, a model without MTP weights, an unsupported family: one line.
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def generate(args, model, head, tokenizer):
    """Plain decoding, then speculative decoding with the MTP head (or the
    acceptance-controlled drafter), and the comparison."""
    if args.float32:
        model.set_dtype(mx.float32)
        head.set_dtype(mx.float32)
    prompt = tokenizer.encode(args.prompt)

    mx.random.seed(args.seed)
    tic = time.perf_counter()
    plain, _ = run(
        mlx_stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            sampler=make_sampler(args.temp),
        )
    )
    plain_time = time.perf_counter() - tic

    if args.acceptance is None:
        drafter = MTPDrafter(model, head)
    else:
        reference = AcceptanceControlledDrafter.record(model, mx.array(prompt), args.max_tokens)
        drafter = AcceptanceControlledDrafter(
            reference, args.acceptance, len(tokenizer.vocab), seed=args.seed
        )
    # temp 0: mlx-lm's greedy rule; temp > 0: speculative sampling.
    sampling = {} if args.temp == 0 else {"distribution": make_distribution(args.temp)}
    stats = Stats()
    mx.random.seed(args.seed)
    tic = time.perf_counter()
    spec, spec_text = run(
        stream_generate(
            model,
            tokenizer,
            prompt,
            drafter,
            max_tokens=args.max_tokens,
            num_draft_tokens=args.num_draft_tokens,
            stats=stats,
            **sampling,
        )
    )
    spec_time = time.perf_counter() - tic

    print("=" * 10)
    print(spec_text)
    print("=" * 10)
    print(
        f"Plain:       {plain[-1].generation_tokens} tokens, "
        f"{plain[-1].generation_tps:.1f} tokens-per-sec ({plain_time:.2f} s in all)"
    )
    print(
        f"Speculative: {spec[-1].generation_tokens} tokens, "
        f"{spec[-1].generation_tps:.1f} tokens-per-sec ({spec_time:.2f} s in all)"
    )
    print(stats.summary())
    print("Accepted drafts per step:", dict(sorted(stats.accepted_histogram().items())))
    if args.temp == 0:
        compare(plain, spec)


if __name__ == "__main__":
    sys.exit(main())
