# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk bench e2e|tp``: the benchmarks of :mod:`mtp_splitk.bench`."""

import sys

from ..bench import e2e, tp
from . import PROG, DefaultsFormatter, Parser

KINDS = {
    "e2e": (e2e, "tokens/s of plain and speculative decoding, unpatched vs patched"),
    "tp": (tp, "tensor-parallel verify latency and greedy agreement, sharded vs one device"),
}


def setup_arg_parser() -> Parser:
    parser = Parser(prog=f"{PROG} bench")
    kinds = parser.add_subparsers(dest="kind", required=True, parser_class=Parser)
    for name, (module, line) in KINDS.items():
        sub = kinds.add_parser(
            name,
            help=line,
            description=module.__doc__.splitlines()[0],
            formatter_class=DefaultsFormatter,
        )
        module.add_arguments(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = setup_arg_parser().parse_args(argv)
    if args.kind == "tp":
        # The arguments after "tp": bench tp --smoke starts its ranks with them.
        tp.run(args, argv[argv.index(args.kind) + 1 :])
    else:
        e2e.run(args)
    return 0
