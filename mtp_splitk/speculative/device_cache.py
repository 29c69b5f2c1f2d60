# Copyright © 2026 mtp_splitk contributors

"""A KV cache whose write position lives on the device.

mlx-lm's ``KVCache`` keeps its offset as a Python int, so a speculative loop
must read each verdict on the host before it can build the next verify pass.
:class:`DeviceKVCache` keeps the offset as a scalar ``mx.array``: the loop
advances it by the accepted count while that count is still a lazy array, and
builds step n+1 before step n has run. Every pass writes its rows at the
offset with a scatter (``mx.put_along_axis``); rows of rejected drafts lie
past the new offset and are overwritten by the next pass. (``mx.slice_update``
at an array start is MLX's DynamicSliceUpdate: on CUDA two kernels a write,
~27 µs for 5 rows against a scatter's few: benchmarks/h200/RUNS.md, run 13.)

The buffer has a fixed capacity, grown on the host in steps of
:attr:`step` positions (:meth:`reserve`), so the graph's shapes change
rarely; attention reads the whole buffer and the mask from
:meth:`make_mask` hides every position past each row's own. MLX's dynamic
slicing does not clamp, so the loop reserves ahead of the largest offset the
device can have reached (:func:`reserve`).

The mask is additive (0 / -inf in the keys' dtype) for the model types of
:data:`ADDITIVE_MASK_TYPES`: MLX's CUDA attention takes no bool mask and
converts one in every layer (two fills and a ``where``, three ops a layer);
built once a forward here, it is the same numbers.
"""

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache

from ..compat import BaseCache
from .recurrent import DeviceArraysCache

# Model types whose attention hands the KV cache's mask to mlx-lm's
# scaled_dot_product_attention and nothing else (DeepSeek-V3's MLA reads it
# as a bool in mx.where: it keeps the bool mask).
ADDITIVE_MASK_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "mimo", "qwen3_next", "qwen3_5", "qwen3_5_moe"}
)


def takes_additive_masks(model) -> bool:
    return getattr(model, "model_type", None) in ADDITIVE_MASK_TYPES


class DeviceKVCache(BaseCache):
    """``KVCache``'s interface with ``offset`` a scalar int32 ``mx.array``.

    :meth:`update_and_fetch` writes the new rows but does not move the
    offset: the loop moves it by what was accepted (:meth:`advance`), which
    only the verdict knows.
    """

    step = 256
    additive = False  # make_mask's kind (module docstring); on_device sets it
    # The last pass's row indices, (offset array, rows, indices): the entries
    # that share an offset array make them once a forward, not once a layer.
    _rows = (None, 0, None)

    def __init__(self, offset: int = 0):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = mx.array(offset, mx.int32)
        self._capacity = 0  # rows allocated, or to allocate at the first write

    @classmethod
    def from_cache(cls, cache: KVCache, positions: int = 0) -> "DeviceKVCache":
        """The same contents as a filled (or empty) ``KVCache``, with room for
        ``positions`` rows (grown once)."""
        c = cls(cache.offset)
        if cache.keys is not None:
            c.keys = cache.keys[..., : cache.offset, :]
            c.values = cache.values[..., : cache.offset, :]
            c._capacity = cache.offset
        c.reserve(max(cache.offset, positions))
        return c

    @property
    def capacity(self) -> int:
        return self._capacity

    def reserve(self, positions: int):
        """Make room for ``positions`` rows (host-side; rounds up to :attr:`step`)."""
        size = -(-positions // self.step) * self.step
        if size <= self._capacity:
            return
        if self.keys is None:
            self._capacity = size
            return
        B, H, _, Dk = self.keys.shape
        extra = size - self._capacity
        self.keys = mx.concatenate([self.keys, mx.zeros((B, H, extra, Dk), self.keys.dtype)], axis=2)
        Dv = self.values.shape[3]
        self.values = mx.concatenate(
            [self.values, mx.zeros((B, H, extra, Dv), self.values.dtype)], axis=2
        )
        self._capacity = size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            B, H, L, Dk = keys.shape
            self.reserve(L)
            self.keys = mx.zeros((B, H, self._capacity, Dk), keys.dtype)
            self.values = mx.zeros((B, H, self._capacity, values.shape[3]), values.dtype)
        rows = self._row_indices(keys.shape[2])
        self.keys = mx.put_along_axis(self.keys, rows, keys, axis=2)
        self.values = mx.put_along_axis(self.values, rows, values, axis=2)
        return self.keys, self.values

    def _row_indices(self, n: int) -> mx.array:
        offset, count, rows = DeviceKVCache._rows
        if offset is not self.offset or count != n:
            rows = (self.offset + mx.arange(n, dtype=mx.int32))[None, None, :, None]
            DeviceKVCache._rows = (self.offset, n, rows)
        return rows

    def advance(self, n):
        """Move the offset by ``n`` rows (an int or a lazy array)."""
        self.offset = self.offset + n

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """(N, capacity): row i sees positions up to ``offset + i``; bool, or
        0 / -inf in the keys' dtype where :attr:`additive`."""
        if window_size is not None:
            raise ValueError("DeviceKVCache does not support sliding windows.")
        positions = self.offset + mx.arange(N, dtype=mx.int32)
        visible = mx.arange(self._capacity, dtype=mx.int32)[None] <= positions[:, None]
        if not self.additive or self.keys is None:
            return visible
        dtype = self.keys.dtype
        return mx.where(visible, mx.array(0, dtype), mx.array(-mx.inf, dtype))

    def to_kv_cache(self, length: int) -> KVCache:
        """A plain ``KVCache`` holding the first ``length`` rows."""
        c = KVCache()
        if self.keys is not None and length > 0:
            c.keys = self.keys[..., :length, :]
            c.values = self.values[..., :length, :]
            c.offset = length
        return c

    @property
    def state(self):
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v
        self._capacity = 0 if self.keys is None else self.keys.shape[2]

    def is_trimmable(self):
        return True

    def trim(self, n):
        self.offset = self.offset - n
        return n

    def size(self):
        return self._capacity

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def position(cache: List) -> int:
    """The rows a list of plain caches holds: its attention entries' offset
    (a hybrid's recurrent entries keep none)."""
    return max((c.offset for c in cache if type(c) is KVCache), default=0)


def on_device(cache: List, positions: int = 0, additive: bool = False) -> List[DeviceKVCache]:
    """Replace every ``KVCache`` of a model's cache list, in place, by a
    :class:`DeviceKVCache` with the same contents and room for ``positions``
    rows (its masks additive with ``additive``: see :func:`takes_additive_masks`),
    and every ``ArraysCache`` by a :class:`~.recurrent.DeviceArraysCache`
    at the same offset; returns the list. KV entries at one offset share one
    offset array, so moving them all costs one op (:func:`advance`)."""
    from . import one_row  # its attention imports this module

    one_row.install()  # one-row passes over these caches through cuDNN on CUDA
    shared = {}
    offset = position(cache)
    for i, c in enumerate(cache):
        if type(c) is ArraysCache:
            cache[i] = DeviceArraysCache(c, offset)
            continue
        cache[i] = DeviceKVCache.from_cache(c, positions)
        cache[i].additive = additive
        cache[i].offset = shared.setdefault(c.offset, cache[i].offset)
    return cache


def pipelinable(cache: List) -> bool:
    """Whether every entry is a plain ``KVCache`` or ``ArraysCache`` (what
    :func:`on_device` takes; the model's recurrent layers must be ones
    :mod:`.recurrent` knows, and a hybrid needs an attention layer for its offset)."""
    kinds = {type(c) for c in cache}
    padded = any(
        c.left_padding is not None or c.lengths is not None for c in cache if type(c) is ArraysCache
    )  # a batch's padding: not a single sequence's cache
    return kinds <= {KVCache, ArraysCache} and (KVCache in kinds or not cache) and not padded


def to_plain(cache: List, length: int):
    """In place, the plain caches holding the first ``length`` rows."""
    for i, c in enumerate(cache):
        cache[i] = c.to_arrays_cache(length) if isinstance(c, DeviceArraysCache) else c.to_kv_cache(length)


def reserve(cache: List[DeviceKVCache], positions: int):
    for c in cache:
        c.reserve(positions)


def _moved(cache: List[DeviceKVCache], new):
    # Entries that shared an offset array share the new one.
    moved = {}
    for c in cache:
        key = id(c.offset)
        if key not in moved:
            moved[key] = new(c.offset)
        c.offset = moved[key]


def advance(cache: List[DeviceKVCache], n):
    """Move every entry's offset by ``n`` (an int or a lazy array); recurrent
    entries keep their state after ``n`` rows of the last pass."""
    for c in cache:
        if isinstance(c, DeviceArraysCache):
            c.commit(n)  # moves its own offset
    _moved([c for c in cache if not isinstance(c, DeviceArraysCache)], lambda offset: offset + n)


def rewind(cache: List[DeviceKVCache], offset):
    """Set every entry's offset (an int or a lazy array; attention caches only)."""
    value = mx.array(offset, mx.int32) if isinstance(offset, int) else offset
    for c in cache:
        c.offset = value
