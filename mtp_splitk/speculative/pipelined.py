# Copyright © 2026 mtp_splitk contributors

"""The overlapped speculative loop: step n+1 is built before step n's verdict
reaches the host.

Every step feeds the target exactly ``M = k+1`` rows, ``[y, d_1..d_k]``, so the
graph's shapes do not depend on what was accepted. The caches are
:class:`~.device_cache.DeviceKVCache` objects whose offsets are device
arrays; the verdict (accepted count, the target's token) stays on the
device, moves the offsets and feeds the drafter (:meth:`Drafter.propose`),
so the host builds and submits step n+1 from lazy arrays, then reads step n's
tokens, which by then are computed, and hands them out: one step late, as
mlx-lm's plain ``generate_step`` reads its tokens. At the end (``max_tokens``,
or the consumer stops, e.g. at EOS) the one step in flight past it is
discarded and the caches are cut back to what was handed out.

The synchronous loop (:func:`~.loop.speculative_generate_step`) stays for what
this one cannot take: caches other than mlx-lm's ``KVCache`` (recurrent
Gated DeltaNet / Mamba states, rotating windows, quantized KV), logits
processors, drafters without :meth:`Drafter.propose`, and models sharded over
several ranks.
"""

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import Sampler, greedy_sampler

from . import device_cache
from .sampling import Distribution, speculative_accept
from .stats import Stats
from .target import TargetParts


@dataclass
class Verdict:
    """One verify pass, as lazy arrays: what a drafter proposes from."""

    inputs: mx.array  # (k+1,) the rows fed: [y, d_1..d_k]
    hidden: Optional[mx.array]  # (1, k+1, D) the target's last hidden states
    accepted: mx.array  # () int32, drafts accepted
    token: mx.array  # (1,) uint32, the target's token after them


def _sharded(model: nn.Module) -> bool:
    return any(
        getattr(m, "group", None) is not None and m.group.size() > 1
        for _, m in model.named_modules()
    )


def unsupported(model: nn.Module, drafter, cache: List[Any], logits_processors) -> Optional[str]:
    """Why the overlapped loop cannot run this generation, or None."""
    if _sharded(model):
        # Seen on MLX's ring backend: after an overlapped run, later
        # collectives of the ranks disagreed (tests/test_distributed.py).
        return "a sharded model's collectives are not pipelined across ranks"
    if logits_processors:
        return "logits processors need the emitted tokens on the host"
    if not getattr(drafter, "pipelined", False):
        return f"{type(drafter).__name__} has no on-device proposal"
    if not device_cache.pipelinable(cache):
        kinds = sorted({type(c).__name__ for c in cache if type(c).__name__ != "KVCache"})
        return f"the model's caches ({', '.join(kinds)}) keep host-side offsets"
    return None


def prefill(model, parts, cache, drafter, prompt: mx.array, step_size: int, progress, after=None):
    """Feed all prompt tokens but the last to the target (and the drafter);
    returns the last one, ``y`` (1,). ``after(cache)`` runs after each chunk
    (the synchronous loop quantizes the KV cache there)."""
    tokens = prompt.astype(mx.uint32)
    total, done = prompt.size, 0
    progress(done, total)
    while tokens.size > 1:
        chunk = tokens[: min(step_size, tokens.size - 1)]
        if parts is None:
            model(chunk[None], cache=cache)
            hidden = None
        else:
            hidden = parts.hidden(chunk[None], cache)
        if after is not None:
            after(cache)
        drafter.prefill(chunk, hidden)
        mx.eval([c.state for c in cache], drafter.state())
        tokens = tokens[chunk.size :]
        done += chunk.size
        progress(done, total)
        mx.clear_cache()
    return tokens


def pipelined_generate_step(
    prompt: mx.array,
    model: nn.Module,
    drafter,
    stream: Union[mx.Stream, Any] = generation_stream,
    *,
    num_draft_tokens: int = 3,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    distribution: Optional[Distribution] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 512,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    stats: Optional[Stats] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Speculative decoding without a host sync per step.

    Same arguments, yields and cache contract as
    :func:`~.loop.speculative_generate_step` (which takes the cases listed
    in the module docstring); ``k = num_draft_tokens`` drafts every step.
    ``stats.verify_time`` is not measured here (that would need a sync).
    """
    if distribution is not None and sampler is not None:
        raise ValueError("Pass either a sampler (mlx-lm's rule) or a distribution.")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
    if prompt.size == 0:
        raise ValueError("The prompt must hold at least one token.")
    sampler = sampler or greedy_sampler
    stats = stats if stats is not None else Stats()
    stats.overlapped = True
    k = num_draft_tokens
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    reason = unsupported(model, drafter, cache, None)
    if reason is not None:
        raise ValueError(f"The overlapped loop cannot run: {reason}.")
    parts = TargetParts(model) if drafter.needs_hidden else None

    def forward(inputs: mx.array):
        if parts is None:
            return model(inputs[None], cache=cache)[0], None
        hidden = parts.hidden(inputs[None], cache)
        return parts.logits(hidden)[0], hidden

    def step(y, drafts, q):
        inputs = mx.concatenate([y, drafts])
        logits, hidden = forward(inputs)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if distribution is None:
            targets = sampler(logprobs).astype(mx.uint32)
            match = (drafts == targets[:k]).astype(mx.int32)
            accepted = mx.cumprod(match).sum() if k else mx.array(0, mx.int32)
            token = mx.take(targets, accepted)[None]
        else:
            accepted, token = speculative_accept(distribution(logprobs), q, drafts)
            token = token.astype(mx.uint32)[None]
        device_cache.advance(cache, accepted + 1)
        verdict = Verdict(inputs, hidden, accepted.astype(mx.int32), token)
        drafts, q = drafter.propose(verdict, k, distribution)
        # Everything the host reads of this step is computed with it.
        mx.async_eval(verdict.inputs, verdict.accepted, verdict.token, drafts)
        return verdict, logprobs, drafts, q

    def reserve(positions: int):
        device_cache.reserve(cache, positions)
        drafter.reserve(positions)

    with mx.stream(stream):
        tic = time.perf_counter()
        drafter.reset()
        progress = prompt_progress_callback or (lambda *_: None)
        y = prefill(model, parts, cache, drafter, prompt, prefill_step_size, progress)
        stats.prompt_tokens += prompt.size
        stats.prompt_time += time.perf_counter() - tic

        tic = time.perf_counter()
        known = prompt.size - 1  # the caches' offset before the step being read
        device_cache.on_device(cache, known + 3 * (k + 1))
        drafter.reserve(known + 3 * (k + 1))
        drafts, q = drafter.start(y, k, distribution)
        current = step(y, drafts, q)
        emitted, handed = 0, 0
        try:
            while True:
                verdict, logprobs, drafts, q = current
                # Step n+1 is built and queued before step n is read: its
                # target rows end within 2(k+1) of the offset known now, and
                # a drafter's rows for step n+2 within 3(k+1).
                upcoming = None
                if max_tokens < 0 or emitted + 1 < max_tokens:
                    reserve(known + 3 * (k + 1))
                    upcoming = step(verdict.token, drafts, q)
                accepted = verdict.accepted.item()
                fed = verdict.inputs.tolist()
                out = [(t, logprobs[j], True) for j, t in enumerate(fed[1 : accepted + 1])]
                out.append((verdict.token.item(), logprobs[accepted], False))
                stats.record_step(k, accepted, k + 1)
                if max_tokens >= 0:
                    out = out[: max_tokens - emitted]
                handed = 0
                for item in out:
                    handed += 1
                    emitted += 1
                    stats.generation_tokens += 1
                    stats.generation_time = time.perf_counter() - tic
                    yield item
                if upcoming is None or (max_tokens >= 0 and emitted >= max_tokens):
                    break
                known += accepted + 1
                handed = 0
                current = upcoming
                if stats.steps % 128 == 0:
                    mx.clear_cache()
        finally:
            # Keep every token before the last one handed out, as after the
            # synchronous loop; the caller's list gets plain KVCaches back.
            length = known + handed
            for i, c in enumerate(cache):
                cache[i] = c.to_kv_cache(length)
