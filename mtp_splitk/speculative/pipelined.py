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

Qwen3-Next's and Qwen3.5's Gated DeltaNet caches come along: every row's
state is kept and the accepted one chosen on the device (:mod:`.recurrent`).
The synchronous loop (:func:`~.loop.speculative_generate_step`) stays for what
this one cannot take: other caches (Mamba states, rotating windows, quantized
KV), logits processors, drafters without :meth:`Drafter.propose`, draft
models with recurrent caches, and models sharded over several ranks.
"""

import time
from typing import Any, Callable, Generator, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import ArraysCache, make_prompt_cache
from mlx_lm.sample_utils import Sampler, greedy_sampler

from .. import patch
from . import device_cache, recurrent
from .sampling import Distribution, speculative_accept
from .stats import Stats
from .verify_rows import decode_arithmetic
from .target import TargetParts


class Verdict(NamedTuple):
    """One verify pass, as lazy arrays: what a drafter proposes from (a tuple:
    mx.compile passes it in and out)."""

    inputs: mx.array  # (k+1,) the rows fed: [y, d_1..d_k]
    hidden: Optional[mx.array]  # (1, k+1, D) the target's last hidden states
    accepted: mx.array  # () int32, drafts accepted
    token: mx.array  # (1,) uint32, the target's token after them


def _sharded(model: nn.Module) -> bool:
    return any(
        getattr(m, "group", None) is not None and m.group.size() > 1
        for _, m in model.named_modules()
    )


def compile_by_default(cache: List[Any]) -> bool:
    """Whether the overlapped loop compiles its step unless told: when the patch is on,
    or for a Gated DeltaNet hybrid. Patched, the host's build of a step is what the loop
    waits on and compile cuts it (1.1-1.7x tok/s on the H200, run 15); a hybrid's step has
    the most ops to build (1.17-1.34x patched and not, run 18); unpatched dense models
    wait on the GPU, and compile measured 0.94-1.10x."""
    return patch.is_enabled() or any(isinstance(c, ArraysCache) for c in cache)


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
    if not recurrent.known(model):
        return "its recurrent layers are not Qwen3-Next / Qwen3.5 Gated DeltaNet ones"
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


class Pipeline:
    """The overlapped loop's steps for one generation, as lazy arrays.

    :meth:`begin` prefills (synchronously), moves the caches to the device
    and returns step 0; :meth:`step` builds the step after a given one and
    queues it with ``mx.async_eval``, reading nothing. The generator below
    reads each step one step late; a benchmark can chain steps unread.
    """

    def __init__(self, model, drafter, cache, k, sampler=None, distribution=None, submit=True,
                 compile_step=False):
        self.model, self.drafter, self.cache, self.k = model, drafter, cache, k
        self.sampler = sampler or greedy_sampler
        self.distribution = distribution
        self.submit = submit  # False: steps stay unevaluated until asked for
        # compile_step: the target's part of a step (and a compilable drafter's) through
        # mx.compile, traced once a cache capacity, then replayed without Python.
        self.compiled = self.compiled_propose = None
        if compile_step:
            self.compiled = _compiled(self._verify, lambda: [c.state for c in self.cache], self._set_states)
            if drafter.compilable:  # its part too: a draft model's or MTP head's passes
                self.compiled_propose = _compiled(lambda verdict: drafter.propose(verdict, k, distribution),
                                                  drafter.device_state, drafter.set_device_state)
        self.close = lambda: None  # undoes what begin() changed in the models
        self.submitted = 0.0  # host seconds in mx.async_eval, summed (the loop's Stats take them)
        self.compiled_steps = 0
        self.parts = TargetParts(model) if drafter.needs_hidden else None

    def _forward(self, inputs: mx.array):
        if self.parts is None:
            return self.model(inputs[None], cache=self.cache)[0], None
        hidden = self.parts.hidden(inputs[None], self.cache)
        return self.parts.logits(hidden)[0], hidden

    def reserve(self, offset: int, steps: int = 1):
        """Room for every row that the next ``steps`` steps and the one in
        flight write, ``offset`` being the position after the last step read:
        the target's rows end within (steps + 1)(k+1) of it, a drafter's rows
        for the step after within (steps + 2)(k+1)."""
        positions = self._room(offset, steps)
        device_cache.reserve(self.cache, positions)
        self.drafter.reserve(positions)

    def _room(self, offset: int, steps: int = 1) -> int:
        return offset + (steps + 2) * (self.k + 1)

    def begin(self, prompt: mx.array, prefill_step_size: int = 512, progress=None):
        """Prefill all prompt tokens but the last; returns (y's position, step 0)."""
        self.drafter.reset()
        y = prefill(
            self.model, self.parts, self.cache, self.drafter, prompt,
            prefill_step_size, progress or (lambda *_: None),
        )
        # The position of y: a reused prompt cache holds rows before the prompt.
        offset = device_cache.position(self.cache)
        # From here verify rows take the decode rows' arithmetic (the prompt
        # went through mlx-lm's own path); close() puts it back.
        undo_rows, undo_recurrent = decode_arithmetic(self.model, self.drafter), recurrent.swap_layers(self.model)
        self.close = lambda: (undo_rows(), undo_recurrent())
        additive = device_cache.takes_additive_masks(self.model)
        device_cache.on_device(self.cache, self._room(offset), additive)  # grown once
        self.drafter.reserve(self._room(offset))
        drafts, q = self.drafter.start(y, self.k, self.distribution)
        return offset, self._step(y, drafts, q)

    def step(self, previous):
        """The step after ``previous`` (a step's tuple), built and queued."""
        verdict, _, drafts, q = previous
        return self._step(verdict.token, drafts, q)

    def _step(self, y, drafts, q):
        compiled = self.compiled is not None and _ready(self.cache)
        self.compiled_steps += compiled
        verdict, logprobs = (self.compiled if compiled else self._verify)(y, drafts, q)
        if self.compiled_propose is not None and _ready(self.drafter.cache):
            drafts, q = self.compiled_propose(verdict)
        else:
            drafts, q = self.drafter.propose(verdict, self.k, self.distribution)
        if self.submit:  # everything the host reads of this step is computed with it
            tic = time.perf_counter()
            mx.async_eval(verdict.inputs, verdict.accepted, verdict.token, drafts)
            self.submitted += time.perf_counter() - tic
        return verdict, logprobs, drafts, q

    def _verify(self, y, drafts, q):
        """The target's part of a step: its forward over [y, drafts], the
        verdict, the caches' offsets moved by what was accepted."""
        k = self.k
        inputs = mx.concatenate([y, drafts])
        logits, hidden = self._forward(inputs)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.distribution is None:
            targets = self.sampler(logprobs).astype(mx.uint32)
            match = (drafts == targets[:k]).astype(mx.int32)
            accepted = mx.cumprod(match).sum() if k else mx.array(0, mx.int32)
            token = mx.take(targets, accepted)[None]
        else:
            accepted, token = speculative_accept(self.distribution(logprobs), q, drafts)
            token = token.astype(mx.uint32)[None]
        device_cache.advance(self.cache, accepted + 1)
        return Verdict(inputs, hidden, accepted.astype(mx.int32), token), logprobs

    def _set_states(self, states):
        for c, state in zip(self.cache, states):
            c.state = state


def _compiled(fn, get_state, set_state):
    """``fn`` through mx.compile, traced anew for new shapes: the state that
    ``get_state()`` returns (arrays that ``fn`` reads and replaces, e.g. its
    caches') goes in and the new one is set back with ``set_state``, MLX's
    random state with them. Its arguments are arrays (trees of them, None);
    what else it reads is a constant of the trace: each Pipeline makes its own."""

    def traced(state, *args):
        set_state(state)
        return fn(*args), get_state()

    compiled = mx.compile(traced, inputs=[mx.random.state], outputs=[mx.random.state])

    def call(*args):
        out, state = compiled(get_state(), *args)
        set_state(state)
        return out

    return call


def _ready(cache: List[Any]) -> bool:
    """Whether a cache list's states can go through mx.compile: attention
    caches on the device, their buffers allocated, and Gated DeltaNet ones."""
    return all(
        (type(c) is device_cache.DeviceKVCache and c.keys is not None)
        or (type(c) is recurrent.DeviceArraysCache and all(a is not None for a in c.cache))
        for c in cache
    )


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
    compile_step: Optional[bool] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Speculative decoding without a host sync per step.

    Same arguments, yields and cache contract as
    :func:`~.loop.speculative_generate_step` (which takes the cases listed
    in the module docstring); ``k = num_draft_tokens`` drafts every step.
    ``stats.verify_time`` is not measured here (that would need a sync).
    ``compile_step``: the target's part of each step through ``mx.compile``
    (traced again when the caches grow, and a hybrid's twice more while its
    Gated DeltaNet caches fill their two passes of candidates), and the
    drafter's where it is :attr:`~.drafters.Drafter.compilable`; ``None``:
    :func:`compile_by_default`.
    """
    if distribution is not None and sampler is not None:
        raise ValueError("Pass either a sampler (mlx-lm's rule) or a distribution.")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
    if prompt.size == 0:
        raise ValueError("The prompt must hold at least one token.")
    stats = stats if stats is not None else Stats()
    stats.overlapped = True
    k = num_draft_tokens
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    reason = unsupported(model, drafter, cache, None)
    if reason is not None:
        raise ValueError(f"The overlapped loop cannot run: {reason}.")
    if compile_step is None:
        compile_step = compile_by_default(cache)
    pipeline = Pipeline(model, drafter, cache, k, sampler, distribution, compile_step=compile_step)

    with mx.stream(stream):
        tic = time.perf_counter()
        known, current = pipeline.begin(prompt, prefill_step_size, prompt_progress_callback)
        stats.prompt_tokens += prompt.size
        stats.prompt_time += time.perf_counter() - tic

        tic = time.perf_counter()
        emitted, handed = 0, 0
        try:
            while True:
                verdict, logprobs, _, _ = current
                # Step n+1 is built and queued before step n is read.
                upcoming = None
                if max_tokens < 0 or emitted + 1 < max_tokens:
                    built, submitted = time.perf_counter(), pipeline.submitted
                    pipeline.reserve(known)
                    upcoming = pipeline.step(current)
                    stats.submit_time += pipeline.submitted - submitted
                    stats.build_time += time.perf_counter() - built - (pipeline.submitted - submitted)
                waited = time.perf_counter()
                accepted = verdict.accepted.item()
                stats.wait_time += time.perf_counter() - waited
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
            device_cache.to_plain(cache, known + handed)
            pipeline.close()
            stats.compiled_steps += pipeline.compiled_steps
