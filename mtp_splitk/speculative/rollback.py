# Copyright © 2026 mtp_splitk contributors

"""Rolling a prompt cache back after a rejection.

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
"""

from typing import Any, Callable, List, Sequence

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, CacheList


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
