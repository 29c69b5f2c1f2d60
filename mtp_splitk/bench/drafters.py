# Copyright © 2026 mtp_splitk contributors

"""Drafters for benchmarks (not for generation)."""

from typing import List, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step

from ..mtp import MTPDrafter
from ..speculative.drafters import Drafter


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

    On device (:meth:`propose`) each reference position's proposal is drawn
    once, up front (seeded): a position is judged at most once, so each
    judged proposal is still accepted with probability ``acceptance``.
    """

    pipelined = True

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
        return [t for t, _ in generate_step(prompt, model, max_tokens=num_tokens)]

    def reset(self):
        self._rng = np.random.default_rng(self.seed)
        self._position = 0  # index in the reference of the token after y
        self._table = None  # on device: the proposal for each position

    def _proposal(self, token: int) -> int:
        if self._rng.random() >= self.acceptance:
            token = (token + int(self._rng.integers(1, self.vocab_size))) % self.vocab_size
        return token

    def draft(self, y, n, distribution):
        proposals = [self._proposal(t) for t in self.reference[self._position : self._position + n]]
        return self._with_q(mx.array(proposals, mx.uint32), distribution)

    def _with_q(self, tokens: mx.array, distribution):
        if distribution is None or not tokens.size:
            return tokens, None
        # A deterministic proposal: q is a point mass on it.
        q = mx.where(mx.arange(self.vocab_size)[None] == tokens[:, None], 0.0, -mx.inf)
        return tokens, q

    def _on_device(self, k: int, distribution):
        # Past the reference, proposals repeat the table's last entry: a guess.
        idx = mx.minimum(self._position + mx.arange(k), self._table.size - 1)
        return self._with_q(mx.take(self._table, idx), distribution)

    def start(self, y, k, distribution):
        self._table = mx.array([self._proposal(t) for t in self.reference] or [0], mx.uint32)
        self._position = mx.array(0, mx.int32)
        return self._on_device(k, distribution)

    def propose(self, verdict, k, distribution):
        self._position = self._position + verdict.accepted + 1
        return self._on_device(k, distribution)

    def accept(self, tokens, hidden):
        self._position += tokens.size


class ReferenceSteering:
    """Mixin for a model drafter, listed before it in the bases: a known
    acceptance at the real drafting cost.

    The drafter runs exactly as in real use (its model or head, its cache,
    its own chain of drafts); each proposal it makes is then replaced, with
    probability ``acceptance``, by the recorded reference token for its
    position (the target's greedy continuation), so under greedy
    verification a judged proposal is accepted with probability about
    ``acceptance`` (more where the drafter itself was right). Whether a
    position is steered is drawn once per position (seeded), on the host
    and on the device alike. Random heads accept ~0 on their own: this
    measures what a real acceptance would give, cost included.
    """

    def __init__(self, *args, reference: Sequence[int], acceptance: float, seed: int = 0, **kwargs):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}.")
        self.reference = list(reference)
        self.acceptance = acceptance
        self.seed = seed
        super().__init__(*args, **kwargs)

    def reset(self):
        super().reset()
        rng = np.random.default_rng(self.seed)
        self._ref_steer = (rng.random(len(self.reference)) < self.acceptance).tolist()
        self._ref_position = 0  # host: index in the reference of the token after y
        self._ref_index = 0  # host: the next proposal's index
        self._ref_device = None  # (reference, steer, position) on the device
        self._ref_draft = 0  # on device: proposals made since start / propose

    def draft(self, y, n, distribution):
        self._ref_index = self._ref_position
        return super().draft(y, n, distribution)

    def accept(self, tokens, hidden):
        super().accept(tokens, hidden)
        self._ref_position += tokens.size

    def start(self, y, k, distribution):
        reference = mx.array(self.reference + [0], mx.uint32)
        steer = mx.array(self._ref_steer + [False])
        self._ref_device = (reference, steer, mx.array(0, mx.int32))
        self._ref_draft = 0
        return super().start(y, k, distribution)

    def propose(self, verdict, k, distribution):
        reference, steer, position = self._ref_device
        self._ref_device = (reference, steer, position + verdict.accepted + 1)
        self._ref_draft = 0
        return super().propose(verdict, k, distribution)

    def choose(self, logits, distribution):
        token, q = super().choose(logits, distribution)
        if self._ref_device is not None:
            reference, steer, position = self._ref_device
            i = mx.minimum(position + self._ref_draft, reference.size - 1)
            token = mx.where(mx.take(steer, i), mx.take(reference, i), token)
            self._ref_draft += 1
        else:
            if self._ref_index < len(self.reference) and self._ref_steer[self._ref_index]:
                token = mx.array([self.reference[self._ref_index]], mx.uint32)
            self._ref_index += 1
        return token, q


class SteeredMTPDrafter(ReferenceSteering, MTPDrafter):
    """An MTP head drafting as in real use (its cache, its self-fed chain,
    its device proposals), each proposal replaced by the recorded reference
    token with probability ``acceptance`` (:class:`ReferenceSteering`): the
    benchmark pays the head's real cost at a known acceptance."""

    def __init__(
        self, model: nn.Module, head, reference: Sequence[int], acceptance: float, seed: int = 0
    ):
        super().__init__(model, head, reference=reference, acceptance=acceptance, seed=seed)
