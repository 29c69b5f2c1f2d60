# Copyright © 2026 mtp_splitk contributors

"""Speculative decoding: draft k tokens, verify them in one target pass.

Each step a :class:`Drafter` proposes up to ``k`` tokens; the target runs
once on them (M = k+1 rows, the small-M shape the split-K kernels are for)
and keeps the longest accepted prefix plus one token of its own. The
generator yields ``(token, logprobs, from_draft)`` exactly like
``mlx_lm.generate.speculative_generate_step``; :func:`stream_generate` wraps
it in mlx-lm's ``GenerationResponse`` (mlx-lm 0.32's own ``stream_generate``
only takes a draft *model*). Greedy output is token-identical to plain greedy
decoding; with a :func:`make_distribution`, speculative sampling keeps the
target's distribution exactly.

- :mod:`.loop`: :func:`speculative_generate_step` (the synchronous loop, and
  the entry that hands the overlapped one what it can take)
- :mod:`.pipelined`: the overlapped loop, no host sync per step, over
  :mod:`.device_cache`'s device-offset KV caches
- :mod:`.stream`: :func:`stream_generate`
- :mod:`.sampling`: the acceptance rules (:func:`speculative_accept`,
  :func:`~.sampling.judge`)
- :mod:`.drafters`: :class:`Drafter`, :class:`DraftModelDrafter` (the MTP
  head's is ``mtp_splitk.mtp.MTPDrafter``)
- :mod:`.rollback`: trimming, or restoring and replaying, the caches after a
  rejection
- :mod:`.overlap`: :func:`layers_started_early`
- :mod:`.target`: :class:`TargetParts`, the target as backbone + LM head
- :mod:`.stats`: :class:`Stats`
"""

from .drafters import DraftModelDrafter, Drafter
from .loop import speculative_generate_step
from .pipelined import pipelined_generate_step
from .overlap import layers_started_early
from .rollback import Rollback
from .sampling import Distribution, make_distribution, speculative_accept
from .stats import Stats
from .stream import stream_generate
from .target import TargetParts

__all__ = [
    "Distribution",
    "DraftModelDrafter",
    "Drafter",
    "Rollback",
    "Stats",
    "TargetParts",
    "layers_started_early",
    "make_distribution",
    "pipelined_generate_step",
    "speculative_accept",
    "speculative_generate_step",
    "stream_generate",
]
