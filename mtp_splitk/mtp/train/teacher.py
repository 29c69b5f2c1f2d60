# Copyright © 2026 mtp_splitk contributors

"""What the target says about the training text, once or every step.

The loss needs, at every position ``j`` of a sequence, the target's hidden
state ``h_j`` and its logits for ``x_{j+1}``. :func:`run_target` computes them
for a batch (the whole distribution, or its top-k). :class:`TeacherCache`
computes the top-k form once for all the data (one forward pass over it,
batched like a prefill) and gathers it per training batch, so a step no
longer runs the target: for small heads on deep targets that is most of a
step's cost. It holds ``D + 2k`` numbers per token (hidden states in the
target's dtype).
"""

from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ...speculative.target import TargetParts
from .data import Sequences, pad

#: (hidden (B, L, D), teacher) where teacher is the full logits (B, L, V) or
#: the top-k ``(indices (B, L, k), logits (B, L, k))``.
Teacher = Tuple[mx.array, object]


def run_target(parts: TargetParts, tokens: mx.array, top_k: int = 0) -> Teacher:
    """The target's hidden states and (top-k) logits at every position."""
    hidden = parts.hidden(tokens)
    logits = parts.logits(hidden).astype(mx.float32)
    if top_k <= 0:
        return hidden, logits
    idx = mx.argpartition(-logits, top_k - 1, axis=-1)[..., :top_k]
    return hidden, (idx.astype(mx.int32), mx.take_along_axis(logits, idx, axis=-1))


class TeacherCache:
    """Top-k teacher outputs of every sequence of ``data``, flat by token."""

    def __init__(
        self,
        parts: TargetParts,
        data: Sequences,
        top_k: int,
        batch_size: int = 32,
        progress=None,
    ):
        lengths = np.array([len(t) for t in data.tokens])
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        hidden: List[Optional[mx.array]] = [None] * len(data)
        idx: List[Optional[mx.array]] = [None] * len(data)
        val: List[Optional[mx.array]] = [None] * len(data)
        order = np.argsort(lengths, kind="stable")  # little padding per batch
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            h, (i, v) = run_target(parts, pad([data.tokens[r] for r in rows]), top_k)
            for b, r in enumerate(rows):
                n = lengths[r]
                hidden[r], idx[r], val[r] = h[b, :n], i[b, :n], v[b, :n]
            mx.eval([(hidden[r], idx[r], val[r]) for r in rows])
            if progress is not None:
                progress(min(s + batch_size, len(order)), len(order))
        self.hidden = mx.concatenate(hidden)
        self.idx = mx.concatenate(idx)
        self.val = mx.concatenate(val)
        mx.eval(self.hidden, self.idx, self.val)

    def batch(self, rows, length: int) -> Teacher:
        """The teacher of sequences ``rows``, right-padded to ``length``
        (padding repeats a sequence's last entries; the loss masks it)."""
        lengths = np.array([self._length(r) for r in rows])
        pos = np.minimum(np.arange(length)[None], lengths[:, None] - 1)
        flat = mx.array(self.starts[np.array(rows)][:, None] + pos)
        return self.hidden[flat], (self.idx[flat], self.val[flat])

    def _length(self, r) -> int:
        end = self.starts[r + 1] if r + 1 < len(self.starts) else self.hidden.shape[0]
        return int(end - self.starts[r])
