# Copyright © 2026 mtp_splitk contributors

"""MTP decoding as a drop-in for mlx-lm's speculative step function.

:func:`generate_step` has the signature of
``mlx_lm.generate.speculative_generate_step`` minus the draft model, so code
that already drives mlx-lm's speculative branch (``stream_generate`` with a
``draft_model``) can swap it in, e.g. with
``functools.partial(generate_step, model_path=path)``.
"""

from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.utils import load_config

from ..speculative.loop import speculative_generate_step
from .drafter import MTPDrafter
from .heads import MTPHead
from .loading import load_head, read_weights, resolve

_HEADS: Dict[str, MTPHead] = {}


def head_for(model: nn.Module, model_path: Union[str, Path]) -> MTPHead:
    """The MTP head of ``model``, read from its checkpoint ``model_path``
    (for a target that was loaded by ``mlx_lm.load``). Cached per path."""
    path = resolve(str(model_path))
    key = str(path.resolve())
    if key not in _HEADS:
        head = load_head(model, load_config(path), read_weights(path), where=path)
        mx.eval(head.parameters())
        _HEADS[key] = head
    return _HEADS[key]


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    stream: Any = generation_stream,
    *,
    head: Optional[MTPHead] = None,
    model_path: Optional[Union[str, Path]] = None,
    **kwargs,
):
    """Speculative decoding of ``model`` with its MTP head.

    Give ``head`` (from :func:`mtp_splitk.mtp.load`) or ``model_path`` (the
    checkpoint the target was loaded from). ``kwargs`` are those of
    :func:`mtp_splitk.speculative.speculative_generate_step` (mlx-lm's
    ``num_draft_tokens``, ``max_tokens``, ``sampler``, ``prompt_cache``, ...,
    plus ``distribution`` and ``stats``). Yields ``(token, logprobs,
    from_draft)``.
    """
    if head is None:
        if model_path is None:
            raise ValueError("generate_step needs the MTP head or the model path.")
        head = head_for(model, model_path)
    return speculative_generate_step(
        prompt, model, MTPDrafter(model, head), stream, **kwargs
    )
