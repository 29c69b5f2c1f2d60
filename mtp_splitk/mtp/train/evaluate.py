# Copyright © 2026 mtp_splitk contributors

"""Held-out acceptance: what greedy speculative decoding will accept.

The target decodes held-out prompts greedily (:func:`.data.generate` at
temperature 0). At every position ``t`` where a first draft can be made
(``t >= prompt_len - 2``: the loop feeds the prompt's last token with the
drafts, so its first draft, of the first generated token, reads
``(h_{P-2}, x_{P-1})``) the head is run as
:class:`mtp_splitk.speculative.MTPDrafter` runs it: its cache holds the
target-fed pairs ``(h_j, x_{j+1})`` for ``j <= t``, the first draft is the
argmax at ``t``, and each further draft feeds the head its own output and the
previous draft (those self-fed cache entries are trimmed before ``t + 1``).
Draft ``k`` is accepted when it and every draft before it equal the greedy
continuation (``x_{t+k+1}``), so ``accept[k]`` is the acceptance of draft
``k`` given that drafts ``1..k-1`` were accepted, and ``1 + sum(chain)`` the
expected tokens per target call with ``depth`` drafts.
"""

from typing import Dict, List

import mlx.core as mx
import numpy as np

from ..heads import MTPHead
from ...speculative.target import TargetParts
from .data import Sequences, pad


def chains(
    head: MTPHead,
    parts: TargetParts,
    data: Sequences,
    depth: int = 3,
    batch_size: int = 16,
) -> List[np.ndarray]:
    """Per sequence, for each first-draft position ``t = prompt_len - 2 ..
    len - 3``: how many leading drafts (of the ``min(depth, len - 2 - t)``
    that can be checked) equal the greedy continuation."""
    out = []
    for s in range(0, len(data), batch_size):
        seqs = data.tokens[s : s + batch_size]
        first = max(min(data.prompt_lens[s : s + batch_size]) - 2, 0)
        tokens = pad(seqs, 1)
        drafts = np.stack(
            [np.array(d) for d in _drafts(head, parts, tokens, depth, first)]
        )
        for b, seq in enumerate(seqs):
            start, n = max(data.prompt_lens[s + b] - 2, 0), len(seq)
            c = np.zeros(max(n - 2 - start, 0), dtype=np.int64)
            for i, t in enumerate(range(start, n - 2)):
                k = 0
                while (
                    k < min(depth, n - 2 - t)
                    and drafts[k, b, t - first] == seq[t + k + 2]
                ):
                    k += 1
                c[i] = k
            out.append(c)
    return out


def acceptance(
    head: MTPHead,
    parts: TargetParts,
    data: Sequences,
    depth: int = 3,
    batch_size: int = 16,
) -> Dict[str, list]:
    """``accept``: per draft, its acceptance given the earlier ones;
    ``chain``: the fraction of positions where drafts ``1..k`` all are;
    ``positions``: how many first-draft positions were judged."""
    hits, judged, given = np.zeros(depth), np.zeros(depth), np.zeros(depth)
    for c in chains(head, parts, data, depth, batch_size):
        checkable = np.minimum(depth, len(c) - np.arange(len(c)))
        for k in range(depth):
            can = checkable > k
            judged[k] += can.sum()
            given[k] += (can & (c >= k)).sum()
            hits[k] += (can & (c > k)).sum()
    return {
        "accept": [float(a) for a in hits / np.maximum(given, 1)],
        "chain": [float(c) for c in hits / np.maximum(judged, 1)],
        "positions": int(judged[0]),
    }


def _drafts(
    head: MTPHead, parts: TargetParts, tokens: mx.array, depth: int, start: int
):
    """Drafts ``1..depth`` at every position from ``start`` on (index ``t -
    start``), as the drafter makes them; the pairs before ``start`` are fed in
    one call, as the drafter feeds a prompt."""
    hidden = parts.hidden(tokens)
    embeds = parts.embed(tokens)
    dtype = hidden.dtype
    cache = head.make_cache()
    if start > 0:
        head(hidden[:, :start], embeds[:, 1 : start + 1], cache)
    out = [[] for _ in range(depth)]
    for t in range(start, tokens.shape[1] - 1):
        g = head(hidden[:, t : t + 1], embeds[:, t + 1 : t + 2], cache)
        for k in range(depth):
            draft = parts.logits(g.astype(dtype)[:, -1]).argmax(-1)
            out[k].append(draft)
            if k + 1 < depth:
                g = head(g, parts.embed(draft[:, None]), cache)
        for c in cache:
            c.trim(depth - 1)
        mx.eval([o[-1] for o in out], [c.state for c in cache])
    return [mx.stack(o, axis=1) for o in out]
