# Copyright © 2026 mtp_splitk contributors

"""The ``mtp-splitk`` command: a dispatcher, as ``mlx_lm.cli`` is.

Each subcommand is a module of :mod:`mtp_splitk.commands` with its own parser
and ``main(argv)``, imported only when it runs:

- ``generate``: ``mlx_lm.generate`` with the patch, every one of its flags,
  plus ``--split-k``, ``--stats`` and ``--mtp``; without ``--model``, a tiny
  synthetic demo built once into the cache;
- ``convert``: ``mlx_lm.convert`` keeping (and quantizing) the MTP head;
- ``synthesize``: a synthetic model directory of any family and size;
- ``tune``: check and time the kernels on this GPU, and write the tuning
  table the planner reads first;
- ``bench e2e|tp``: the benchmarks.

``mtp-splitk --version`` prints the versions of mtp_splitk, mlx and mlx-lm.

Bad input ends with one ``mtp-splitk: error: ...`` line on stderr and exit
status 2.
"""

import importlib
import importlib.metadata
import sys

from . import __version__
from .commands import PROG, Parser, UsageError

# name: the line the top-level help gives it
COMMANDS = {
    "generate": "mlx_lm.generate with the split-K patch (all of its flags, plus the ones below)",
    "convert": "mlx_lm.convert keeping the checkpoint's MTP head (all of its flags but "
    "--dequantize)",
    "synthesize": "write a synthetic mlx-lm model directory (random weights, real layout)",
    "tune": "check and time the split-K kernels on this GPU; write its tuning table",
    "train-mtp": "train an MTP head for a model without one (self-distillation)",
    "bench": "benchmarks",
}


def version() -> str:
    # From the installed metadata: importing mlx-lm to ask it takes a second.
    versions = {name: importlib.metadata.version(name) for name in ("mlx", "mlx-lm")}
    return f"mtp_splitk {__version__} (mlx {versions['mlx']}, mlx-lm {versions['mlx-lm']})"


def build_parser() -> Parser:
    """The top level alone: its help, and its errors for a missing or unknown
    command (a command's own arguments are its module's to parse)."""
    parser = Parser(prog=PROG, description="Split-K quantized matmuls and MTP decoding for mlx-lm.")
    parser.add_argument("--version", action="version", version=version())
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, line in COMMANDS.items():
        subparsers.add_parser(name, help=line, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in COMMANDS:
            command, rest = argv[0], argv[1:]
        else:  # help, or an error; a command only after a leading "--"
            command = build_parser().parse_args(argv).command
            rest = argv[argv.index(command) + 1 :]
        module = importlib.import_module(f"{__package__}.commands.{command.replace('-', '_')}")
        return module.main(rest)
    except (UsageError, ValueError, OSError) as e:
        # Bad input (a flag, a path, a model that does not fit) is one line,
        # never a traceback. ValueError and OSError are how mlx-lm reports
        # missing files, mismatched draft tokenizers and bad configs.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
