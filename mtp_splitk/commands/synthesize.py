# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk synthesize``: a synthetic model directory of any family and
size (real shapes for the GPU), with progress on stderr."""

from pathlib import Path

from .. import synthetic
from ..bench.harness import ByteProgress
from . import PROG, Parser, UsageError


def setup_arg_parser() -> Parser:
    parser = Parser(
        prog=f"{PROG} synthesize",
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
    parser.add_argument("--mode", default="affine", choices=["affine", "mxfp4", "mxfp8", "nvfp4"])
    parser.add_argument("--no-quantize", action="store_true", help="write float weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
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
        progress=ByteProgress(f"[{PROG}] writing {args.family} {args.size}"),
    )
    print(path)
    return 0
