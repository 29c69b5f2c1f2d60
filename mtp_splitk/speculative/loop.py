# Copyright © 2026 mtp_splitk contributors

"""The draft / verify loop.

:func:`speculative_generate_step` runs the overlapped loop (:mod:`.pipelined`)
wherever it can take the generation, and otherwise the synchronous loop
below, which takes every cache and option. Each step the drafter proposes up to ``k`` tokens after the last one, ``y``;
the target runs once on ``[y, d_1, ..., d_k]`` (M = k+1 rows) and the step
keeps the longest accepted prefix plus one token from the target (see
:mod:`.sampling` for the acceptance rules and :mod:`.rollback` for how the
caches forget rejected rows).

Overlap in the synchronous loop: drafting needs no host sync. Draft tokens stay lazy arrays chained
into the verify graph and are started with ``mx.async_eval`` while the host
builds the verify pass and while the consumer handles the previous step's
tokens (the next step's drafts are launched *before* its tokens are
yielded). The one synchronisation per step is reading the verdict: the
accepted count decides the next inputs, the cache rollback and the drafter's
state, so nothing after it can be queued before it. To report a synchronised
verify time we wait for the drafts before submitting the verify pass; its
graph is already built by then, so this costs only the submission latency.
"""

import time
from typing import Any, Callable, Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import (
    DEFAULT_QUANTIZED_KV_START,
    generation_stream,
    maybe_quantize_kv_cache,
)
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import LogitsProcessor, Sampler, greedy_sampler

from .drafters import Drafter
from .overlap import layers_started_early
from .pipelined import pipelined_generate_step, prefill, unsupported
from .rollback import Rollback
from .sampling import Distribution, judge, speculative_accept
from .stats import Stats
from .verify_rows import decode_arithmetic
from .target import TargetParts


def num_drafts(emitted: int, num_draft_tokens: int, max_tokens: int) -> int:
    """Drafts to ask for in the step after ``emitted`` tokens: ``num_draft_tokens``,
    fewer near ``max_tokens`` (``-1``: no limit), where the step's drafts and the
    target's token would pass it; none when one token or none is left."""
    if max_tokens < 0:
        return num_draft_tokens
    return max(0, min(num_draft_tokens, max_tokens - emitted - 1))


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    drafter: Drafter,
    stream: Union[mx.Stream, Any] = generation_stream,
    *,
    num_draft_tokens: int = 3,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    distribution: Optional[Distribution] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 512,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    stats: Optional[Stats] = None,
    submit_every: int = 0,
    overlap: bool = True,
    compile_step: Optional[bool] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Speculative decoding with any :class:`Drafter`; see the module docstring.

    Args:
        prompt: (L,) prompt token ids.
        model: the target (any mlx-lm model; a drafter that reads hidden
          states needs one that :class:`TargetParts` can split).
        drafter: proposes the draft tokens.
        num_draft_tokens: ``k``, drafts per step (fewer near ``max_tokens``).
        max_tokens: tokens to generate; ``-1`` for no limit.
        sampler: picks the target's tokens under mlx-lm's rule (greedy by
          default). Not used with ``distribution``.
        distribution: use speculative sampling against this distribution (see
          :func:`make_distribution`).
        logits_processors: applied to the target's logits of every verify row,
          with the tokens before that row (drafts are proposals; they do not
          see them).
        prompt_cache: the target's cache, updated in place. When the generator
          closes it holds the prompt and every emitted token but the last
          (the next input), as after mlx-lm's speculative loop.
        prefill_step_size, kv_bits, kv_group_size, quantized_kv_start,
          prompt_progress_callback: as for ``mlx_lm.generate.generate_step``.
        stats: filled in as the generation runs.
        submit_every: submit each verify pass to the device every this many
          decoder layers, while its graph is still being built (see
          :func:`layers_started_early`); 0 submits it whole.
        overlap: run the overlapped loop (:mod:`.pipelined`: no host sync
          per step, every step ``k`` drafts) where it can take the generation;
          ``stats.overlap_off`` says why not, where it cannot.
        compile_step: in the overlapped loop, the target's part of each step
          (and a draft model's or MTP head's) through ``mx.compile``; ``None``:
          when the patch is on or the model is a Gated DeltaNet hybrid
          (:func:`~.pipelined.compile_by_default`).

    Yields:
        ``(token, logprobs, from_draft)``: ``logprobs`` is the target's (V,)
        log-softmax for that token's position; ``from_draft`` says the token
        was a draft the target accepted.
    """
    if distribution is not None and sampler is not None:
        raise ValueError("Pass either a sampler (mlx-lm's rule) or a distribution.")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
    if prompt.size == 0:
        raise ValueError("The prompt must hold at least one token.")
    stats = stats if stats is not None else Stats()
    caller_cache = prompt_cache is not None
    cache = prompt_cache if caller_cache else make_prompt_cache(model)
    if overlap:
        reason = unsupported(model, drafter, cache, logits_processors)
        if reason is None and kv_bits is not None:
            reason = "a quantized KV cache (kv_bits) keeps host-side offsets"
        if reason is None and submit_every:
            reason = "submit_every applies to the synchronous loop"
        if reason is None:
            yield from pipelined_generate_step(
                prompt,
                model,
                drafter,
                stream,
                num_draft_tokens=num_draft_tokens,
                max_tokens=max_tokens,
                sampler=sampler,
                distribution=distribution,
                prompt_cache=cache,
                prefill_step_size=prefill_step_size,
                prompt_progress_callback=prompt_progress_callback,
                stats=stats,
                compile_step=compile_step,
            )
            return
        stats.overlap_off = reason
    sampler = sampler or greedy_sampler
    progress = prompt_progress_callback or (lambda *_: None)
    parts = TargetParts(model) if drafter.needs_hidden else None

    def forward(inputs: mx.array):
        """(L,) -> (logits (L, V), hidden (1, L, D) or None)."""
        with layers_started_early(model, submit_every):
            if parts is None:
                logits, hidden = model(inputs[None], cache=cache), None
            else:
                hidden = parts.hidden(inputs[None], cache)
                logits = parts.logits(hidden)
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
        return logits[0], hidden

    rollback = Rollback(cache, forward, max_pending=num_draft_tokens + 1)
    history = prompt.astype(mx.uint32)  # the target's context, for processors

    def process(logits: mx.array, new: mx.array) -> mx.array:
        if not logits_processors:
            return logits
        rows = []
        for j in range(logits.shape[0]):
            context = mx.concatenate([history, new[: j + 1]])
            row = logits[j : j + 1]
            for processor in logits_processors:
                row = processor(context, row)
            rows.append(row)
        return mx.concatenate(rows)

    with mx.stream(stream):
        tic = time.perf_counter()
        drafter.reset()
        y = prefill(
            model,
            parts,
            cache,
            drafter,
            prompt,
            prefill_step_size,
            progress,
            lambda c: maybe_quantize_kv_cache(c, quantized_kv_start, kv_group_size, kv_bits),
        )
        stats.prompt_tokens += prompt.size
        stats.prompt_time += time.perf_counter() - tic

        tic = time.perf_counter()
        undo = decode_arithmetic(model, drafter)  # the prompt went through mlx-lm's path
        # The tokens fed since rollback.begin() and how many of them were
        # handed out, so that a consumer's early exit leaves the cache right.
        fed, handed = [], 0
        try:
            k = num_drafts(0, num_draft_tokens, max_tokens)
            drafts, q = drafter.draft(y, k, distribution)
            mx.async_eval(drafts)
            emitted = 0
            while True:
                new = mx.concatenate([y, drafts])
                inputs = rollback.begin(new)
                fed, handed = [], 0
                offset = rollback.offset
                logits, hidden = forward(inputs)
                logits = process(logits[offset:], new)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                if distribution is None:
                    verdict = sampler(logprobs)
                else:
                    verdict = speculative_accept(distribution(logprobs), q, drafts)
                mx.eval(drafts)
                t0 = time.perf_counter()
                mx.eval(verdict)
                stats.verify_time += time.perf_counter() - t0

                fed = new.tolist()
                accepted, token = judge(verdict, fed[1:])
                rollback.keep(accepted + 1, fed)
                kept = new[: accepted + 1]
                if logits_processors:
                    history = mx.concatenate([history, kept])
                if hidden is not None:
                    hidden = hidden[:, offset : offset + accepted + 1]
                drafter.accept(kept, hidden)
                stats.record_step(len(fed) - 1, accepted, inputs.size)

                out = [
                    (t, logprobs[j], True) for j, t in enumerate(fed[1 : accepted + 1])
                ]
                out.append((token, logprobs[accepted], False))
                if max_tokens >= 0:
                    out = out[: max_tokens - emitted]
                finished = max_tokens >= 0 and emitted + len(out) >= max_tokens

                # Launch the next drafts before handing out this step's tokens,
                # so the device drafts while the consumer detokenizes.
                y = mx.array([token], mx.uint32)
                if not finished:
                    k = num_drafts(emitted + len(out), num_draft_tokens, max_tokens)
                    drafts, q = drafter.draft(y, k, distribution)
                    mx.async_eval(drafts)

                for item in out:
                    handed += 1
                    emitted += 1
                    stats.generation_tokens += 1
                    stats.generation_time = time.perf_counter() - tic
                    yield item
                if finished:
                    break
                if stats.steps % 128 == 0:
                    mx.clear_cache()
        finally:
            # The cache keeps every token before the last one handed out.
            rollback.keep(handed, fed)
            if caller_cache:
                rollback.settle()
            undo()
