# Copyright © 2026 mtp_splitk contributors

"""Split-K small-M quantized matmuls and MTP speculative decoding for mlx-lm."""

from .ops import gather_qmm, quantized_matmul
from .plan import set_split, split

__version__ = "0.1.0"

_PATCH_API = ("enable", "disable", "enabled", "is_enabled")


def __getattr__(name):
    # enable / disable / enabled live in .patch, which imports mlx_lm (and with
    # it transformers: a second or more); loaded on first use, so that
    # `import mtp_splitk` for the ops alone stays as light as mlx.core.
    if name in _PATCH_API:
        from . import patch

        return getattr(patch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
