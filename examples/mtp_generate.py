# Copyright © 2026 mtp_splitk contributors

"""Generate with and without multi-token prediction and compare.

    python examples/mtp_generate.py                       # tiny synthetic Qwen3-Next
    python examples/mtp_generate.py --family deepseek_v3  # other layouts
    python examples/mtp_generate.py --model path/to/converted-with-mtp
    python examples/mtp_generate.py --acceptance 0.7      # a known acceptance rate

Without ``--model`` a tiny synthetic model with random MTP weights is written
to a temporary directory. Its MTP head is random, so nearly every draft is
rejected; ``--acceptance`` swaps in the acceptance-controlled drafter (the
target's recorded greedy continuation, each token kept with that
probability) to show the loop at a given acceptance rate. At temperature 0
the output should equal plain decoding token for token; the script checks
and explains a difference (a near-tie rounded differently, see --float32).

The same decoding with every ``mlx_lm.generate`` flag (chat template,
sampling, prompt cache files) is ``mtp-splitk generate --mtp [--model PATH]``;
``mtp-splitk convert`` makes such a PATH from a Hugging Face checkpoint.
"""

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.sample_utils import make_sampler

from mtp_splitk import mtp
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.mtp import MTPDrafter
from mtp_splitk.speculative import Stats, make_distribution, stream_generate


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    return parser.parse_args()


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


def main():
    args = parse_args()
    if args.model is None:
        from mtp_splitk.synthetic import write_mtp_model

        path = Path(tempfile.mkdtemp()) / args.family
        print(
            f"[INFO] Writing a tiny synthetic {args.family} with MTP weights to {path}"
        )
        write_mtp_model(path, args.family, seed=args.seed)
    else:
        path = args.model
    model, head, tokenizer = mtp.load(path)
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
        reference = AcceptanceControlledDrafter.record(
            model, mx.array(prompt), args.max_tokens
        )
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
    main()
