# Copyright © 2026 mtp_splitk contributors

"""Multi-token-prediction heads for mlx-lm models: layouts, loading, conversion.

- :func:`load` -> ``(model, mtp_head, tokenizer)``
- :func:`generate_step`: mlx-lm's speculative step function, drafting with
  the MTP head (:func:`head_for` finds it for an ``mlx_lm.load``-ed target);
  :class:`MTPDrafter`: that drafter, for :mod:`mtp_splitk.speculative`'s loop
- :func:`convert` / :func:`add_convert_args` / :func:`convert_main`: an
  mlx-lm conversion that keeps (and quantizes) the MTP head
- :mod:`.heads`: the head modules; :mod:`.families`: where each family keeps
  its MTP tensors
"""

from .convert import add_convert_args, convert, convert_main
from .drafter import MTPDrafter
from .families import FAMILIES, Family, family_for
from .generate import generate_step, head_for
from .heads import DeepSeekMTP, MiMoMTP, MTPHead, QwenMTP
from .loading import MTP_SHARD, load, load_head

__all__ = [
    "FAMILIES",
    "MTP_SHARD",
    "DeepSeekMTP",
    "Family",
    "MTPDrafter",
    "MTPHead",
    "MiMoMTP",
    "QwenMTP",
    "add_convert_args",
    "convert",
    "convert_main",
    "family_for",
    "generate_step",
    "head_for",
    "load",
    "load_head",
]
