# Copyright © 2026 mtp_splitk contributors

"""The MTP head as a drafter for :mod:`mtp_splitk.speculative`'s loop."""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..speculative import device_cache
from ..speculative.drafters import Drafter, stack_drafts
from ..speculative.target import TargetParts
from .heads import MTPHead


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

    On device (:meth:`propose`) the head is fed all ``k+1`` pairs of the
    verify pass, the target's token standing in for the draft after the
    last accepted row; the causal mask keeps the rows past it (rejected
    drafts) out of that row, and the next step overwrites them.
    """

    needs_hidden = True
    pipelined = True
    device_attributes = ("_position",)

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
        self._position = None  # on device: the position of the next y

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
            return stack_drafts(tokens, qs)
        g = self._feed(self._hidden + [self._last], self._tokens + [y])[:, -1:]
        self._hidden, self._tokens, self._last = [], [], None
        for i in range(n):
            token, q = self.choose(self.parts.logits(g[:, -1]), distribution)
            tokens.append(token)
            qs.append(q)
            if i + 1 < n:
                g = self.head(g, self.parts.embed(token[None]), self.cache)
        self._self_fed = n - 1
        return stack_drafts(tokens, qs)

    def accept(self, tokens, hidden):
        for c in self.cache:
            c.trim(self._self_fed)
        self._self_fed = 0
        self._observe(tokens, hidden)

    def _step(self, hidden: mx.array, tokens: mx.array) -> mx.array:
        """Feed (1, L, D) hidden states and the (L,) tokens after them."""
        out = self.head(hidden, self.parts.embed(tokens[None]), self.cache)
        device_cache.advance(self.cache, tokens.size)
        return out

    def _drafts(self, g: mx.array, k: int, distribution):
        """``k`` drafts from the head's output row ``g`` (1, 1, D)."""
        tokens, qs = [], []
        for i in range(k):
            token, q = self.choose(self.parts.logits(g[:, -1]), distribution)
            tokens.append(token)
            qs.append(q)
            if i + 1 < k:
                g = self._step(g, token)
        return stack_drafts(tokens, qs)

    def start(self, y, k, distribution):
        device_cache.on_device(self.cache, getattr(self, "_room", 0), not self.head.mask_as_array)
        self._position = self.cache[0].offset + (self._last is not None)
        if self._last is None:  # a one-token prompt: no hidden state to draft from
            return mx.zeros((k,), mx.uint32), None
        g = self._step(self._last, y)
        self._last = None
        return self._drafts(g, k, distribution)

    def propose(self, verdict, k, distribution):
        # The pairs (h_j, next token) of the verify rows, the target's token
        # after the last accepted row; row a's output drafts the next step.
        a, p = verdict.accepted, self._position
        device_cache.rewind(self.cache, p)
        nxt = mx.concatenate([verdict.inputs[1:], verdict.token])
        nxt = mx.where(mx.arange(k + 1) == a, verdict.token, nxt)
        out = self._step(verdict.hidden, nxt)
        device_cache.rewind(self.cache, p + a + 1)
        self._position = p + a + 1
        return self._drafts(mx.take(out, a[None], axis=1), k, distribution)
