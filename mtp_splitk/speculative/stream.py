# Copyright © 2026 mtp_splitk contributors

"""``stream_generate`` with any drafter: mlx-lm's response objects around
:func:`~.loop.speculative_generate_step`."""

import time
from typing import Any, Generator, List, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generation_stream, wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .drafters import Drafter
from .loop import speculative_generate_step


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, List[int]],
    drafter: Drafter,
    max_tokens: int = 256,
    stream: Union[mx.Stream, Any] = generation_stream,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """``mlx_lm.stream_generate`` with a :class:`Drafter`.

    Same prompt handling, detokenization, stop rule and
    ``GenerationResponse`` fields as mlx-lm 0.32's, whose own
    ``stream_generate`` only accepts a draft *model*. ``kwargs`` go to
    :func:`speculative_generate_step` (pass ``stats=Stats()`` to keep the
    speculation counters); mlx-lm options that speculation cannot honour
    (``max_kv_size``: a rotating cache past its window cannot be rolled back;
    ``input_embeddings``) raise or are dropped as mlx-lm does.
    """
    if max_tokens == 0:
        raise ValueError(
            "Maximum number of tokens must be non-zero (use -1 for no limit)."
        )
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if not isinstance(prompt, mx.array):
        if isinstance(prompt, str):
            add_special_tokens = tokenizer.bos_token is None or not prompt.startswith(
                tokenizer.bos_token
            )
            prompt = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        prompt = mx.array(prompt)
    kwargs.pop("max_kv_size", None)
    if kwargs.pop("input_embeddings", None) is not None:
        raise ValueError("Speculative decoding does not support input embeddings.")

    detokenizer = tokenizer.detokenizer
    token_generator = speculative_generate_step(
        prompt, model, drafter, stream, max_tokens=max_tokens, **kwargs
    )
    with wired_limit(model, [stream]):
        tic = time.perf_counter()
        for n, (token, logprobs, from_draft) in enumerate(token_generator):
            if n == 0:
                prompt_time = time.perf_counter() - tic
                prompt_tps = prompt.size / prompt_time
                tic = time.perf_counter()
            if token in tokenizer.eos_token_ids:
                break

            detokenizer.add_token(token)
            if (n + 1) == max_tokens:
                break

            yield GenerationResponse(
                text=detokenizer.last_segment,
                token=token,
                logprobs=logprobs,
                from_draft=from_draft,
                prompt_tokens=prompt.size,
                prompt_tps=prompt_tps,
                generation_tokens=n + 1,
                generation_tps=(n + 1) / (time.perf_counter() - tic),
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=None,
            )

        detokenizer.finalize()
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason="stop" if token in tokenizer.eos_token_ids else "length",
        )
