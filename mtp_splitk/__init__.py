# Copyright © 2026 mtp_splitk contributors

"""Split-K small-M quantized matmuls and MTP speculative decoding for mlx-lm.

The ops, drop-in replacements with MLX's signatures and semantics (a
split-K kernel takes a call where the planner measured it faster, MLX's op
every other)::

    y = mtp_splitk.quantized_matmul(x, w, scales, biases, group_size=64, bits=4)
    y = mtp_splitk.gather_qmm(x, w, scales, biases, rhs_indices=idx)

The patch, which routes mlx-lm's quantized layers through them (models
already loaded switch too; ``MTP_SPLITK=1`` in the environment enables it
for the stock ``mlx_lm`` commands)::

    mtp_splitk.enable()  # or: with mtp_splitk.enabled(): ...
    mtp_splitk.disable()

The split policy: ``set_split(None)`` follows the device's tuning table,
``set_split(0)`` always takes MLX's op, ``set_split(n)`` forces the kernel
with n warps along K for every M <= 64; ``with split(n):`` for a block.
"""

from .ops import gather_qmm, quantized_matmul
from .plan import set_split, split

__version__ = "0.1.0"

_PATCH_API = ("enable", "disable", "enabled", "is_enabled")
__all__ = ["quantized_matmul", "gather_qmm", *_PATCH_API, "split", "set_split"]


def __getattr__(name):
    # enable / disable / enabled live in .patch, which imports mlx_lm (and with
    # it transformers: a second or more); loaded on first use, so that
    # `import mtp_splitk` for the ops alone stays as light as mlx.core.
    if name in _PATCH_API:
        from . import patch

        return getattr(patch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    # help() and dir() list the patch functions too (listing them loads .patch).
    return sorted({*globals(), *_PATCH_API})
