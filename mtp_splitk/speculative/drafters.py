# Copyright © 2026 mtp_splitk contributors

"""Drafters: what proposes the draft tokens that the target verifies.

:class:`Drafter` is the interface the loop drives; :class:`DraftModelDrafter`
drafts with a smaller model. The MTP-head drafter is
``mtp_splitk.mtp.MTPDrafter``.
"""

from typing import Any, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import device_cache
from .rollback import Rollback
from .sampling import Distribution


class Drafter:
    """Proposes draft tokens. One instance drives one generation at a time.

    The loop calls :meth:`reset`, then :meth:`prefill` for each prompt chunk
    the target processes (all prompt tokens but the last), then alternates
    :meth:`draft` and :meth:`accept` (the synchronous loop), or calls
    :meth:`start` once and :meth:`propose` every step (the overlapped loop,
    :mod:`.pipelined`, for drafters with ``pipelined = True``).
    """

    #: Whether :meth:`prefill` / :meth:`accept` want the target's last hidden
    #: states (the loop then runs the target as backbone + LM head).
    needs_hidden: bool = False
    #: Whether :meth:`start` / :meth:`propose` exist (the overlapped loop).
    pipelined: bool = False

    def start(
        self, y: mx.array, k: int, distribution: Optional[Distribution]
    ) -> Tuple[mx.array, Optional[mx.array]]:
        """After prefill: exactly ``k`` drafts to follow ``y`` (1,), as lazy
        arrays (``q`` as for :meth:`draft`)."""
        raise NotImplementedError

    def propose(
        self, verdict, k: int, distribution: Optional[Distribution]
    ) -> Tuple[mx.array, Optional[mx.array]]:
        """Exactly ``k`` drafts to follow ``verdict.token``, from the lazy
        :class:`~.pipelined.Verdict` of the step before (its inputs, the
        target's hidden states, accepted count and token): no host sync."""
        raise NotImplementedError

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` rows in the drafter's caches (``self.cache``,
        if it has one) once :meth:`start` has moved them to the device; the
        number is kept for :meth:`start`."""
        self._room = positions
        cache = getattr(self, "cache", ())
        device_cache.reserve([c for c in cache if isinstance(c, device_cache.DeviceKVCache)], positions)

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
        """Arrays to evaluate with the target's cache during prefill: the
        drafter's own cache (``self.cache``), if it has one."""
        return [c.state for c in getattr(self, "cache", ())]

    #: The names of the attributes that :meth:`propose` reads and writes besides
    #: ``self.cache`` (device arrays only): set, the overlapped loop's
    #: ``compile_step`` traces :meth:`propose` with them and the cache's states
    #: passed in and out (:meth:`device_state`).
    device_attributes: Tuple[str, ...] = ()

    @property
    def compilable(self) -> bool:
        """Whether ``compile_step`` may trace :meth:`propose`: a drafter that
        names its device attributes and does not steer :meth:`choose` (a
        steering override may keep host state, which a trace would freeze)."""
        return bool(self.device_attributes) and type(self).choose is Drafter.choose

    def device_state(self) -> List[Any]:
        """What :meth:`propose` reads and writes: the cache's states, then the
        :attr:`device_attributes`."""
        return [[c.state for c in self.cache]] + [getattr(self, name) for name in self.device_attributes]

    def set_device_state(self, state: List[Any]) -> None:
        for c, entry in zip(self.cache, state[0]):
            c.state = entry
        for name, value in zip(self.device_attributes, state[1:]):
            setattr(self, name, value)

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


def stack_drafts(
    tokens: List[mx.array], qs: List[Optional[mx.array]]
) -> Tuple[mx.array, Optional[mx.array]]:
    """:meth:`Drafter.draft`'s result from per-draft (1,) tokens and (1, V)
    logprobs (``None`` entries for greedy picks)."""
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

    On device (:meth:`propose`) every step has one shape whatever was
    accepted: the cache goes back to the last accepted row and is fed two
    tokens, that row's token again and the target's token, then ``k - 1``
    single drafts.
    """

    device_attributes = ("_base", "_seq")

    @property
    def pipelined(self) -> bool:  # its cache is rewound: attention caches only
        return all(type(c) is KVCache for c in make_prompt_cache(self.model))

    def __init__(self, draft_model: nn.Module, max_pending: int = 8):
        self.model = draft_model
        self.max_pending = max_pending
        self.reset()

    def reset(self):
        self.cache = make_prompt_cache(self.model)
        self.rollback = Rollback(self.cache, self._forward, self.max_pending)
        self._fed: List[mx.array] = []
        self._base = None  # on device: the cache row of the next y
        self._seq = None  # on device: [y, drafts] of the step in flight

    def _forward(self, tokens: mx.array) -> mx.array:
        return self.model(tokens[None], cache=self.cache)[:, -1, :]

    def prefill(self, tokens, hidden):
        self.model(tokens[None], cache=self.cache)

    def draft(self, y, n, distribution):
        tokens, qs = [], []
        if n == 0:
            self._fed = []
            return stack_drafts(tokens, qs)
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
        return stack_drafts(tokens, qs)

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

    def _logits(self, tokens: mx.array) -> mx.array:
        logits = self.model(tokens[None], cache=self.cache)[:, -1, :]
        device_cache.advance(self.cache, tokens.size)
        return logits

    def _run(self, first: mx.array, before: mx.array, k, distribution):
        """``k`` drafts from ``first`` (its last row's logits come first);
        remembers ``[before, drafts]``, the rows the next step can keep."""
        tokens, qs = [], []
        logits = self._logits(first) if k else None
        for i in range(k):
            token, q = self.choose(logits, distribution)
            tokens.append(token)
            qs.append(q)
            if i + 1 < k:
                logits = self._logits(token)
        drafts, q = stack_drafts(tokens, qs)
        self._seq = mx.concatenate([before, drafts])
        return drafts, q

    def start(self, y, k, distribution):
        device_cache.on_device(
            self.cache, getattr(self, "_room", 0), device_cache.takes_additive_masks(self.model)
        )
        self._base = self.cache[0].offset  # where y goes
        return self._run(y, y, k, distribution)

    def propose(self, verdict, k, distribution):
        # Back to the last accepted row, whose token is fed again (its rows
        # were written from the same prefix), then the target's token.
        a = verdict.accepted
        device_cache.rewind(self.cache, self._base + a)
        fed = mx.concatenate([mx.take(self._seq, a)[None], verdict.token])
        self._base = self._base + a + 1
        if k == 0:
            self._logits(fed)  # keep the cache abreast
            self._seq = verdict.token
            return mx.array([], mx.uint32), None
        return self._run(fed, verdict.token, k, distribution)
