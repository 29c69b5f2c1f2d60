# Copyright © 2026 mtp_splitk contributors

"""Plain decoding as the overlapped loop at k = 0: one token a step on the
device-offset caches, the step replayed through ``mx.compile``.

mlx-lm's ``generate_step`` builds every step's graph in Python; the
overlapped loop's compiled step is traced once per cache capacity and
replayed, so the host's part of a step is MLX's encoding of its kernels and
little else. :func:`decode_generate_step` has ``generate_step``'s arguments
and yields; what the overlapped loop cannot take (logits processors, KV
quantization, prompt embeddings, caches other than plain attention and
Qwen3-Next / Qwen3.5 Gated DeltaNet ones, sharded models) goes to
``generate_step`` itself.
"""

from typing import Any, Callable, Dict, Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step as _mlx_generate_step
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import make_prompt_cache

from .drafters import Drafter
from .pipelined import pipelined_generate_step, unsupported
from .stats import Stats


class NoDrafter(Drafter):
    """Proposes nothing: a step verifies the one token it has."""

    pipelined = True

    def start(self, y, k, distribution):
        return mx.array([], mx.uint32), None

    def propose(self, verdict, k, distribution):
        return mx.array([], mx.uint32), None


# generate_step's options that only matter with kv_bits.
_KV_QUANTIZATION = ("kv_group_size", "quantized_kv_start")


def fallback_reason(model: nn.Module, prompt_cache: List[Any], options: Dict[str, Any]) -> Optional[str]:
    """Why :func:`decode_generate_step` hands a call with these other ``generate_step``
    ``options`` to mlx-lm's ``generate_step``, or None."""
    set_ = sorted(name for name, value in options.items() if name not in _KV_QUANTIZATION and value)
    if set_:
        return f"{', '.join(set_)} set"
    return unsupported(model, NoDrafter(), prompt_cache, None)


def decode_generate_step(
    prompt: mx.array,
    model: nn.Module,
    stream: Union[mx.Stream, Any] = generation_stream,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    compile_step: Optional[bool] = True,
    stats: Optional[Stats] = None,
    **options,
) -> Generator[Tuple[int, mx.array], None, None]:
    """``mlx_lm.generate.generate_step``'s arguments and ``(token, logprobs)``
    yields; the steps on the overlapped loop at k = 0 where it can take them
    (``compile_step``: its step through ``mx.compile``; ``None``: as the
    speculative loop decides), else ``generate_step`` itself. ``stats``: the
    overlapped loop's :class:`~.stats.Stats` (left untouched by ``generate_step``)."""
    if prompt_cache is None:
        prompt_cache = make_prompt_cache(model, max_kv_size=options.get("max_kv_size"))
    if fallback_reason(model, prompt_cache, options) is not None:
        yield from _mlx_generate_step(
            prompt, model, stream, max_tokens=max_tokens, sampler=sampler, prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size, prompt_progress_callback=prompt_progress_callback,
            **options,
        )
        return
    steps = pipelined_generate_step(
        prompt, model, NoDrafter(), stream, num_draft_tokens=0, max_tokens=max_tokens, sampler=sampler,
        prompt_cache=prompt_cache, prefill_step_size=prefill_step_size,
        prompt_progress_callback=prompt_progress_callback, compile_step=compile_step, stats=stats,
    )
    for token, logprobs, _ in steps:
        yield token, logprobs
