# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk convert``: ``mlx_lm.convert`` keeping (and quantizing) the
checkpoint's MTP head (``mtp_splitk.mtp.convert``)."""

from .. import mtp
from . import PROG, Parser, check_model_path


def setup_arg_parser() -> Parser:
    parser = Parser(
        prog=f"{PROG} convert",
        description=(
            "Convert a Hugging Face checkpoint with mlx_lm.convert and keep its MTP "
            "head, cast and quantized like the target, in mtp.safetensors (stock "
            "mlx_lm.load still loads the target; generate --mtp uses the head)."
        ),
    )
    mtp.add_convert_args(parser)
    return parser


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    # A missing local directory would otherwise be taken for a Hub repository
    # and fail in the download.
    check_model_path(args.hf_path, "--hf-path")
    print(mtp.convert_main(args))
    return 0
