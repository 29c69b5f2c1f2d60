# Copyright © 2026 mtp_splitk contributors

"""Speculative decoding: draft k tokens, verify them in one target pass.

Each step a :class:`Drafter` proposes up to ``k`` tokens after the last one,
``y``; the target runs once on ``[y, d_1, ..., d_k]`` (M = k+1 rows, the
small-M shape the split-K kernels are for) and we keep the longest accepted
prefix plus one token from the target (a correction, or a bonus token when
every draft was accepted). The generator yields ``(token, logprobs,
from_draft)`` exactly like ``mlx_lm.generate.speculative_generate_step``;
:func:`stream_generate` wraps it in mlx-lm's ``GenerationResponse``
(mlx-lm 0.32's own ``stream_generate`` only takes a draft *model*).

Acceptance rules
----------------
- ``distribution=None`` (default): mlx-lm's rule. The target picks a token
  per row with ``sampler`` (greedy by default) and drafts are accepted while
  they equal the target's picks. With greedy sampling the output is
  token-identical to plain greedy decoding. With a random sampler every
  emitted token is still a sample from the target (the draft only decides
  how many rows are usable), at the acceptance rate ``p(d)``.
- ``distribution=make_distribution(temp, ...)``: standard speculative
  sampling (Leviathan et al. 2023, Chen et al. 2023): drafts are sampled from
  the drafter's distribution ``q``, accepted with probability
  ``min(1, p(d) / q(d))``; the first rejected row is resampled from
  ``norm(max(p - q, 0))``; after a full acceptance the bonus token comes
  from ``p``. The output is distributed exactly as sampling from ``p``, with
  a higher acceptance rate than mlx-lm's rule.

Rolling back the target
-----------------------
After a rejection the caches hold rows for rejected drafts. Trimmable caches
(``KVCache``, ``QuantizedKVCache``) are trimmed. Recurrent caches
(``ArraysCache``: Gated DeltaNet in Qwen3-Next/3.5, Mamba) keep only their
final state, so before each verify pass we snapshot them (a list of array
references: mlx-lm's layers *replace* the arrays, they never write into
them, so this costs nothing) and, on a rejection, restore the snapshot, drop
the pass's rows from the attention caches too, and re-feed the accepted
tokens *as the first rows of the next verify pass* instead of in a pass of
their own: one target call per step either way, at a few more rows (cheap at
small M). If rejections keep deferring tokens, more than ``k+1`` of them are
flushed in a call of their own, which bounds M at ``2(k+1)``.

Overlap
-------
Drafting needs no host sync: draft tokens stay lazy arrays chained into the
verify graph and are started with ``mx.async_eval`` while the host builds the
verify pass and while the consumer handles the previous step's tokens (the
next step's drafts are launched *before* its tokens are yielded). The one
synchronisation per step is reading the verdict: the accepted count decides
the next inputs, the cache rollback and the drafter's state, so nothing
after it can be queued before it. To report a synchronised verify time we
wait for the drafts before submitting the verify pass; its graph is already
built by then, so this costs only the submission latency.
"""

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import (
    DEFAULT_QUANTIZED_KV_START,
    GenerationResponse,
    generation_stream,
    maybe_quantize_kv_cache,
    wired_limit,
)
from mlx_lm.models.cache import ArraysCache, CacheList, make_prompt_cache
from mlx_lm.sample_utils import (
    LogitsProcessor,
    Sampler,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
)
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .mtp.heads import MTPHead
from .mtp.target import TargetParts

Distribution = Callable[[mx.array], mx.array]


def make_distribution(
    temp: float,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Distribution:
    """``logprobs -> logprobs`` of the distribution that
    ``mlx_lm.sample_utils.make_sampler`` with the same arguments samples from
    (same filters, same order, then the temperature). XTC is left out: it
    randomises the distribution itself, so it has no ``p`` to accept against.
    """
    if temp <= 0:
        raise ValueError(
            "Speculative sampling needs temp > 0; use the default greedy rule "
            "(distribution=None) for temp 0."
        )

    def distribution(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p != 0.0:
            logprobs = apply_min_p(logprobs, min_p, min_tokens_to_keep)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        logits = logprobs * (1 / temp)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    return distribution


def speculative_accept(
    p_logprobs: mx.array, q_logprobs: mx.array, drafts: mx.array
) -> Tuple[mx.array, mx.array]:
    """Standard speculative sampling for one step, on the device.

    Args:
        p_logprobs: (n+1, V) target distribution per row.
        q_logprobs: (n, V) distribution each draft was sampled from.
        drafts: (n,) draft tokens.

    Returns:
        (number of accepted drafts, next token) as scalar arrays; the next
        token is the resampled correction or, if all were accepted, the bonus.
    """
    n = drafts.size
    if n == 0:
        return mx.array(0), mx.random.categorical(p_logprobs[0])
    p = mx.exp(p_logprobs)
    q = mx.exp(q_logprobs)
    rows = mx.arange(n)
    p_d, q_d = p[rows, drafts], q[rows, drafts]
    # Accept with probability min(1, p/q), without dividing.
    accepted = mx.random.uniform(shape=(n,)) * q_d <= p_d
    num_accepted = mx.cumprod(accepted.astype(mx.int32)).sum()
    residual = mx.maximum(p[:n] - q, 0)
    total = residual.sum(axis=-1, keepdims=True)
    # p <= q everywhere means p == q: nothing left over, sample from p.
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p[:n])
    choices = mx.concatenate([residual, p[n:]], axis=0)
    samples = mx.random.categorical(mx.log(choices))
    return num_accepted, samples[num_accepted]


@dataclass
class Stats:
    """Counters and timings of one speculative generation.

    Times are in seconds. ``verify_time`` is synchronised: the drafts are
    complete when each verify pass is submitted and it ends when its verdict
    is on the host, so it measures the target's ``M = k+1`` forward alone.
    """

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    #: Drafts the target judged and rejected (at most one per step).
    rejected: int = 0
    verify_time: float = 0.0
    #: Rows through the target in verify passes, replayed rows included.
    verify_rows: int = 0
    accepted_per_step: List[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """Accepted / judged: the probability a draft is accepted given that
        the drafts before it were (Leviathan et al.'s alpha). Drafts after
        the first rejection of a step are never judged."""
        judged = self.accepted + self.rejected
        return self.accepted / judged if judged else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generation_tokens / self.steps if self.steps else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        if not self.generation_time:
            return 0.0
        return self.generation_tokens / self.generation_time

    @property
    def mean_verify_time(self) -> float:
        return self.verify_time / self.steps if self.steps else 0.0

    def record_step(self, drafted: int, accepted: int, rows: int):
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejected += accepted < drafted
        self.accepted_per_step.append(accepted)
        self.verify_rows += rows

    def accepted_histogram(self) -> Counter:
        """Accepted drafts per step -> number of steps."""
        return Counter(self.accepted_per_step)

    def summary(self) -> str:
        return (
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {self.generation_tokens} tokens, "
            f"{self.generation_tps:.3f} tokens-per-sec\n"
            f"Speculation: {self.steps} steps, {self.drafted} drafted, "
            f"{self.accepted} accepted ({self.acceptance_rate:.1%}; per token "
            f"{self.per_token_acceptance:.1%}), {self.tokens_per_step:.2f} tokens/step, "
            f"verify {1e3 * self.mean_verify_time:.2f} ms/step"
        )


# -- cache rollback ------------------------------------------------------------------------


def _leaves(cache: List[Any]) -> List[Any]:
    out = []
    for c in cache:
        out.extend(_leaves(c.caches) if isinstance(c, CacheList) else [c])
    return out


class Rollback:
    """Rolls a prompt cache back to a prefix of what was fed since :meth:`begin`.

    Trimmable caches are trimmed. Recurrent ``ArraysCache`` states are
    snapshot at :meth:`begin` and restored; the tokens kept are then *owed*
    (:attr:`pending`) and go in front of the next :meth:`begin`'s tokens, so
    no call of their own is needed. See the module docstring.
    """

    def __init__(self, cache: List[Any], forward: Callable, max_pending: int):
        self.cache = cache
        self.forward = forward
        self.max_pending = max_pending
        self.pending: List[int] = []
        self._snapshot = None
        self._owed: List[int] = []  # pending at the last begin()
        self._kept = 0  # tokens of this call still counted as fed
        self._restored = False

    @property
    def leaves(self) -> List[Any]:
        # Looked up each time: kv_bits swaps KVCache entries of the list for
        # QuantizedKVCache ones mid-generation.
        return _leaves(self.cache)

    @property
    def recurrent(self) -> bool:
        return any(isinstance(c, ArraysCache) for c in self.leaves)

    def _check(self):
        for c in self.leaves:
            if not c.is_trimmable() and not isinstance(c, ArraysCache):
                raise ValueError(
                    f"Speculative decoding cannot roll back a {type(c).__name__} "
                    "(it is neither trimmable nor a recurrent ArraysCache)."
                )

    def begin(self, tokens: mx.array) -> mx.array:
        """Inputs for a call that feeds ``tokens``: the owed tokens first."""
        self._check()
        if len(self.pending) > self.max_pending:
            self.forward(mx.array(self.pending, mx.uint32))
            self.pending = []
        if self.recurrent:
            self._snapshot = [
                (
                    (list(c.cache), c.left_padding, c.lengths)
                    if isinstance(c, ArraysCache)
                    else None
                )
                for c in self.leaves
            ]
        self._owed, self.pending = self.pending, []
        self._kept = tokens.size
        self._restored = False
        if not self._owed:
            return tokens
        return mx.concatenate([mx.array(self._owed, mx.uint32), tokens])

    @property
    def offset(self) -> int:
        """Rows of owed tokens in front of the last :meth:`begin`'s tokens."""
        return len(self._owed)

    def extend(self, count: int = 1):
        """``count`` more tokens were fed since :meth:`begin` (draft loops)."""
        self._kept += count

    def keep(self, n: int, fed: Sequence[int]):
        """Keep the first ``n`` tokens fed since :meth:`begin` (``fed`` lists
        them). May be called again with a smaller ``n``."""
        if n >= self._kept:
            return
        if not self.recurrent:
            for c in self.leaves:
                c.trim(self._kept - n)
        else:
            if not self._restored:
                # Attention layers drop every row of this call, recurrent
                # layers go back to the snapshot, and the kept tokens are fed
                # again in front of the next call.
                rows = len(self._owed) + self._kept
                for c, saved in zip(self.leaves, self._snapshot):
                    if saved is None:
                        c.trim(rows)
                    else:
                        c.cache = list(saved[0])
                        c.left_padding, c.lengths = saved[1], saved[2]
                self._restored = True
            self.pending = self._owed + list(fed[:n])
        self._kept = n

    def owe(self, tokens: Sequence[int]):
        """Tokens to feed in front of the next call (e.g. a draft model's last
        accepted draft, which it proposed but never consumed)."""
        self.pending.extend(tokens)

    def settle(self):
        """Feed what is owed, so the cache covers every kept token."""
        if self.pending:
            self.forward(mx.array(self.pending, mx.uint32))
            self.pending = []
            mx.eval([c.state for c in self.cache])


class _Started:
    """A decoder layer whose output is submitted to the device as soon as
    its graph is built (see :func:`layers_started_early`)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        arrays = [a for a in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(a, mx.array)]
        mx.async_eval(arrays)
        return out

    def __getattr__(self, name):
        # Models read attributes of their layers in the forward (sliding or
        # linear-attention flags): those of the wrapped layer.
        return getattr(self.layer, name)


@contextmanager
def layers_started_early(model: nn.Module, every: int):
    """Within the block, every ``every``-th decoder layer of ``model``
    submits its output as soon as its graph is built.

    A verify pass must wait for the previous verdict, so its graph cannot be
    built while the device runs the previous pass (plain decoding hides its
    graph building that way). Submitting the pass in pieces lets the device
    run the first layers while the host builds the rest. Values are
    unchanged: only when the work is submitted. ``every <= 0``, or a model
    without a ``layers`` list, leaves the model alone.

    Measured on an H200 (README, run 6): it sped up MLX's own loop and slowed
    the patched one, whose host time per layer is the larger; so it is off
    unless asked for.
    """
    # The backbone's own list (a model's ``layers`` property may return a copy).
    text = getattr(model, "language_model", model)
    layers = getattr(getattr(text, "model", None), "layers", None)
    if not isinstance(layers, list):
        layers = getattr(model, "layers", None)
    if every <= 0 or not isinstance(layers, list):
        yield
        return
    # The last layer is left alone: the caller evaluates the whole pass.
    chosen = list(range(every - 1, len(layers) - 1, every))
    originals = [layers[i] for i in chosen]
    for i in chosen:
        layers[i] = _Started(layers[i])
    try:
        yield
    finally:
        for i, layer in zip(chosen, originals):
            layers[i] = layer


# -- drafters ------------------------------------------------------------------------------


class Drafter:
    """Proposes draft tokens. One instance drives one generation at a time.

    The loop calls :meth:`reset`, then :meth:`prefill` for each prompt chunk
    the target processes (all prompt tokens but the last), then alternates
    :meth:`draft` and :meth:`accept`.
    """

    #: Whether :meth:`prefill` / :meth:`accept` want the target's last hidden
    #: states (the loop then runs the target as backbone + LM head).
    needs_hidden: bool = False

    def reset(self) -> None:
        pass

    def prefill(self, tokens: mx.array, hidden: Optional[mx.array]) -> None:
        """The target consumed prompt ``tokens`` (L,); ``hidden`` (1, L, D)."""

    def draft(
        self, y: mx.array, n: int, distribution: Optional[Distribution]
    ) -> Tuple[mx.array, Optional[mx.array]]:
        """Up to ``n`` tokens to follow ``y`` (1,), which the target has not
        consumed yet. Returns ``(tokens (k,), q)`` with ``k <= n``; ``q`` is
        the (k, V) logprobs each token was sampled from when ``distribution``
        is given (drafts are then samples from it), else ``None`` (drafts are
        the drafter's best guesses). Arrays may be lazy."""
        raise NotImplementedError

    def accept(self, tokens: mx.array, hidden: Optional[mx.array]) -> None:
        """The target consumed ``tokens`` = ``[y, accepted drafts...]``;
        ``hidden`` (1, len(tokens), D). The next ``y`` is the target's token."""

    def state(self) -> List[Any]:
        """Arrays to evaluate with the target's cache during prefill."""
        return []

    def choose(
        self, logits: mx.array, distribution: Optional[Distribution]
    ) -> Tuple[mx.array, Optional[mx.array]]:
        """A proposal (1,) from the drafter's (1, V) logits, and the (1, V)
        logprobs it was sampled from (``None`` for a greedy pick). Model-based
        drafters call this for every draft; override it to steer proposals
        while keeping their cache mechanics (the tests do)."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if distribution is None:
            return mx.argmax(logprobs, axis=-1).astype(mx.uint32), None
        q = distribution(logprobs)
        return mx.random.categorical(q).astype(mx.uint32), q


def _finish(tokens: List[mx.array], qs: List[Optional[mx.array]]):
    if not tokens:
        return mx.array([], mx.uint32), None
    drafts = mx.concatenate(tokens)
    return drafts, (mx.concatenate(qs) if qs[0] is not None else None)


class DraftModelDrafter(Drafter):
    """A smaller model of the same vocabulary drafts autoregressively.

    Its cache rolls back like the target's (trim, or snapshot and re-feed for
    a hybrid draft model). After a full acceptance its last draft was
    proposed but never consumed, so it is fed in front of the next ``y``
    (as in ``mlx_lm``'s ``speculative_generate_step``).
    """

    def __init__(self, draft_model: nn.Module, max_pending: int = 8):
        self.model = draft_model
        self.max_pending = max_pending
        self.reset()

    def reset(self):
        self.cache = make_prompt_cache(self.model)
        self.rollback = Rollback(self.cache, self._forward, self.max_pending)
        self._fed: List[mx.array] = []

    def _forward(self, tokens: mx.array) -> mx.array:
        return self.model(tokens[None], cache=self.cache)[:, -1, :]

    def prefill(self, tokens, hidden):
        self.model(tokens[None], cache=self.cache)

    def draft(self, y, n, distribution):
        tokens, qs = [], []
        if n == 0:
            self._fed = []
            return _finish(tokens, qs)
        logits = self._forward(self.rollback.begin(y))
        self._fed = [y]
        for i in range(n):
            token, q = self.choose(logits, distribution)
            tokens.append(token)
            qs.append(q)
            mx.async_eval(token)
            if i + 1 < n:
                logits = self._forward(token)
                self.rollback.extend()
                self._fed.append(token)
        return _finish(tokens, qs)

    def accept(self, tokens, hidden):
        if not self._fed:  # no draft this step: y goes in front of the next
            self.rollback.owe(tokens.tolist())
            return
        fed = mx.concatenate(self._fed).tolist()
        drafted = len(fed)  # y and all drafts but the last were consumed
        accepted = tokens.size - 1
        self.rollback.keep(min(accepted + 1, drafted), fed)
        if accepted == drafted:  # the last draft was proposed, never consumed
            self.rollback.owe(tokens[-1:].tolist())
        self._fed = []

    def state(self):
        return [c.state for c in self.cache]


class MTPDrafter(Drafter):
    """Drafts with an MTP head, iterated on its own hidden state.

    The head's input at position ``i`` is the target's hidden state ``h_i``
    and token ``t_{i+1}``; its cache holds one entry per such pair, computed
    from the *target's* hidden states (what the head was trained on). A draft
    step: one call on the pairs not yet seen plus ``(h_last, y)`` gives the
    first draft; each further draft feeds the head its own output and the
    previous draft. After verification those self-fed entries are trimmed
    and the accepted tokens' pairs, with the target's hidden states from the
    verify pass, are fed at the next draft call.
    """

    needs_hidden = True

    def __init__(self, model: nn.Module, head: MTPHead):
        self.parts = TargetParts(model)
        self.head = head
        self.reset()

    def reset(self):
        self.cache = self.head.make_cache()
        self._last: Optional[mx.array] = None  # hidden row awaiting its token
        self._hidden: List[mx.array] = []  # pairs not fed yet
        self._tokens: List[mx.array] = []
        self._self_fed = 0

    def _observe(self, tokens: mx.array, hidden: mx.array):
        """Pair each token with the hidden state of the position before it."""
        if self._last is not None:
            self._hidden.append(self._last)
            self._tokens.append(tokens[:1])
        if tokens.size > 1:
            self._hidden.append(hidden[:, :-1])
            self._tokens.append(tokens[1:])
        self._last = hidden[:, -1:]

    def _feed(self, hidden: List[mx.array], tokens: List[mx.array]) -> mx.array:
        h = mx.concatenate(hidden, axis=1)
        e = self.parts.embed(mx.concatenate(tokens)[None])
        return self.head(h, e, self.cache)

    def prefill(self, tokens, hidden):
        self._observe(tokens, hidden)
        if self._hidden:  # keep the head's cache abreast of long prompts
            self._feed(self._hidden, self._tokens)
            self._hidden, self._tokens = [], []

    def draft(self, y, n, distribution):
        tokens, qs = [], []
        if n == 0 or self._last is None:
            return _finish(tokens, qs)
        g = self._feed(self._hidden + [self._last], self._tokens + [y])[:, -1:]
        self._hidden, self._tokens, self._last = [], [], None
        for i in range(n):
            token, q = self.choose(self.parts.logits(g[:, -1]), distribution)
            tokens.append(token)
            qs.append(q)
            if i + 1 < n:
                g = self.head(g, self.parts.embed(token[None]), self.cache)
        self._self_fed = n - 1
        return _finish(tokens, qs)

    def accept(self, tokens, hidden):
        for c in self.cache:
            c.trim(self._self_fed)
        self._self_fed = 0
        self._observe(tokens, hidden)

    def state(self):
        return [c.state for c in self.cache]


class AcceptanceControlledDrafter(Drafter):
    """For benchmarks: a known acceptance rate, whatever the weights.

    Given the target's greedy continuation of the prompt (``reference``,
    e.g. from :meth:`record`), each proposal is the recorded token with
    probability ``acceptance`` and another token otherwise (seeded). Under
    greedy verification a proposal is then accepted with probability
    ``acceptance`` given that the ones before it were, so
    ``Stats.per_token_acceptance`` estimates ``acceptance`` and
    ``Stats.acceptance_rate`` approaches ``(a - a^(k+1)) / ((1 - a) k)``.
    It costs no device work, so a benchmark measures the verify path alone.
    """

    def __init__(
        self,
        reference: Sequence[int],
        acceptance: float,
        vocab_size: int,
        seed: int = 0,
    ):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}.")
        self.reference = list(reference)
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self.seed = seed
        self.reset()

    @staticmethod
    def record(model: nn.Module, prompt: mx.array, num_tokens: int) -> List[int]:
        """The target's greedy continuation of ``prompt`` (mlx-lm's loop)."""
        from mlx_lm.generate import generate_step

        return [t for t, _ in generate_step(prompt, model, max_tokens=num_tokens)]

    def reset(self):
        self._rng = np.random.default_rng(self.seed)
        self._position = 0  # index in the reference of the token after y

    def draft(self, y, n, distribution):
        proposals = []
        for token in self.reference[self._position : self._position + n]:
            if self._rng.random() >= self.acceptance:
                token = (
                    token + int(self._rng.integers(1, self.vocab_size))
                ) % self.vocab_size
            proposals.append(token)
        tokens = mx.array(proposals, mx.uint32)
        if distribution is None or not proposals:
            return tokens, None
        # A deterministic proposal: q is a point mass on it.
        q = mx.where(mx.arange(self.vocab_size)[None] == tokens[:, None], 0.0, -mx.inf)
        return tokens, q

    def accept(self, tokens, hidden):
        self._position += tokens.size


# -- the loop ------------------------------------------------------------------------------


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
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Speculative decoding with any :class:`Drafter`; see the module docstring.

    Args:
        prompt: (L,) prompt token ids.
        model: the target (any mlx-lm model; an :class:`MTPDrafter` needs one
          of the families in :mod:`mtp_splitk.mtp.families`).
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
    sampler = sampler or greedy_sampler
    stats = stats if stats is not None else Stats()
    progress = prompt_progress_callback or (lambda *_: None)
    caller_cache = prompt_cache is not None
    cache = prompt_cache if caller_cache else make_prompt_cache(model)
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

    def drafts_for(emitted: int) -> int:
        if max_tokens < 0:
            return num_draft_tokens
        return max(0, min(num_draft_tokens, max_tokens - emitted - 1))

    with mx.stream(stream):
        tic = time.perf_counter()
        drafter.reset()
        tokens = prompt.astype(mx.uint32)
        total, done = prompt.size, 0
        progress(done, total)
        while tokens.size > 1:
            chunk = tokens[: min(prefill_step_size, tokens.size - 1)]
            if parts is None:
                model(chunk[None], cache=cache)
                hidden = None
            else:
                hidden = parts.hidden(chunk[None], cache)
            maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
            drafter.prefill(chunk, hidden)
            mx.eval([c.state for c in cache], drafter.state())
            tokens = tokens[chunk.size :]
            done += chunk.size
            progress(done, total)
            mx.clear_cache()
        stats.prompt_tokens += prompt.size
        stats.prompt_time += time.perf_counter() - tic

        tic = time.perf_counter()
        y = tokens
        drafts, q = drafter.draft(y, drafts_for(0), distribution)
        mx.async_eval(drafts)
        emitted = 0
        # The tokens fed since rollback.begin() and how many of them were
        # handed out, so that a consumer's early exit leaves the cache right.
        fed, handed = [], 0
        try:
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
                accepted, token = _judge(verdict, fed[1:], distribution is None)
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
                    k = drafts_for(emitted + len(out))
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


def _judge(verdict, drafts: List[int], greedy: bool) -> Tuple[int, int]:
    """(accepted drafts, the target's token) from a verify pass's verdict."""
    if not greedy:
        num_accepted, token = verdict
        return num_accepted.item(), token.item()
    targets = verdict.tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]


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
