# Copyright © 2026 mtp_splitk contributors

"""The target's KV cache in the overlapped loop: rows written at slots the host knows.

A :class:`~.device_cache.DeviceKVCache` writes each pass's rows at its
device-side offset, a ``DynamicSliceUpdate``, which MLX's CUDA backend runs
as an offset kernel, an allocation and a copy (two a layer: keys and
values). :class:`SlottedKVCache` writes every pass at the next free slots,
a number the host knows (``written``): an ordinary ``SliceUpdate``. Rows of
rejected drafts are left where they are and hidden: a :class:`SlotTable`,
one for all the layers of a model, holds the position of the row in each
slot (:data:`EMPTY` where there is none), and the mask lets a query see a
slot whose position is at most its own. RoPE still takes the device offset.

A pass takes ``k+1`` slots whatever was accepted, so the slots run out
faster than positions; when they do, :meth:`SlotTable.compact` moves the
live rows to the front on the device (an argsort of the positions and one
gather a buffer) before the buffers grow.
"""

from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from ..compat import BaseCache

EMPTY = 2**31 - 1  # the position of a slot without a row: no query sees it


class SlotTable:
    """Positions of the rows in the slots, shared by a model's slotted caches."""

    def __init__(self, rows: int):
        self.positions = mx.arange(rows, dtype=mx.int32)  # (capacity,) once reserved
        self.written = rows  # host: slots [0, written) have been handed out
        self.caches: List["SlottedKVCache"] = []
        self._pass = None  # (first slot, rows' positions) of the pass being built

    @property
    def capacity(self) -> int:
        return self.positions.size

    def open(self, rows: int, offset: mx.array):
        """The next pass writes ``rows`` rows at positions ``offset + i``."""
        start = self.written
        if start + rows > self.capacity:
            raise RuntimeError(f"{rows} rows do not fit the slots ({start} of {self.capacity} used): reserve first.")
        positions = offset + mx.arange(rows, dtype=mx.int32)
        self.positions[start : start + rows] = positions  # a SliceUpdate: the host knows where
        self.written += rows
        self._pass = (start, positions)

    @property
    def first_slot(self) -> int:
        if self._pass is None:
            raise RuntimeError("A slotted cache was written outside a pass (device_cache.open_pass).")
        return self._pass[0]

    def mask(self, rows: int, dtype: Optional[mx.Dtype]) -> mx.array:
        """(rows, capacity): the slots each row of the open pass sees; bool,
        or additive (0 / -inf) in ``dtype``."""
        visible = self.positions[None] <= self._pass[1][:rows, None]
        if dtype is None:
            return visible
        return mx.where(visible, mx.array(0, dtype), mx.array(-mx.inf, dtype))

    def commit(self, kept):
        """Keep the first ``kept`` rows (an int or a lazy array) of the open pass."""
        start, positions = self._pass
        rows = positions.size
        self.positions[start : start + rows] = mx.where(mx.arange(rows) < kept, positions, EMPTY)
        self._pass = None

    def reserve(self, slots: int, live_bound: int):
        """Room for ``slots`` more slots. ``live_bound``: at most that many
        slots hold rows (the host's count of the accepted rows so far, plus
        the rows of the passes it has not read)."""
        if self.written + slots <= self.capacity:
            return
        if live_bound < self.written:
            self.compact(live_bound)
        step = SlottedKVCache.step
        size = -(-(self.written + slots) // step) * step
        if size > self.capacity:
            pad = size - self.capacity
            self.positions = mx.concatenate([self.positions, mx.full((pad,), EMPTY, mx.int32)])
            for c in self.caches:
                c.grow(pad)

    def compact(self, live_bound: int):
        """Live rows to the front, in position order (on the device); the
        host counts ``live_bound`` slots as used from here on."""
        order = mx.argsort(self.positions)
        self.positions = mx.take(self.positions, order)
        for c in self.caches:
            c.keys = mx.take(c.keys, order, axis=2)
            c.values = mx.take(c.values, order, axis=2)
        self.written = live_bound

    def live_slots(self, length: int) -> np.ndarray:
        """The slots of positions 0..length-1, in order (reads the device)."""
        positions = np.array(self.positions)
        slots = np.nonzero(positions < length)[0]
        slots = slots[np.argsort(positions[slots], kind="stable")]
        if not np.array_equal(positions[slots], np.arange(length)):
            raise RuntimeError(f"the slots do not hold positions 0..{length - 1}")
        return slots


class SlottedKVCache(BaseCache):
    """``KVCache``'s interface for the target of the overlapped loop: rows at
    the slots of a :class:`SlotTable` (module docstring), ``offset`` the
    next position as a device array (RoPE's), moved by the loop."""

    step = 256

    def __init__(self, cache: KVCache, table: SlotTable, offset: mx.array, additive: bool):
        self.table = table
        self.offset = offset
        self.additive = additive
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        if cache.keys is not None:
            self.keys = cache.keys[..., : cache.offset, :]
            self.values = cache.values[..., : cache.offset, :]
        table.caches.append(self)

    def grow(self, pad: int):
        if self.keys is None:
            return  # allocated at the first write, at the table's capacity
        B, H, _, Dk = self.keys.shape
        self.keys = mx.concatenate([self.keys, mx.zeros((B, H, pad, Dk), self.keys.dtype)], axis=2)
        Dv = self.values.shape[3]
        self.values = mx.concatenate([self.values, mx.zeros((B, H, pad, Dv), self.values.dtype)], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        capacity = self.table.capacity
        if self.keys is None or self.keys.shape[2] < capacity:  # first write (or a prompt-less start)
            B, H, _, Dk = keys.shape
            old_k, old_v = self.keys, self.values
            self.keys = mx.zeros((B, H, capacity, Dk), keys.dtype)
            self.values = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
            if old_k is not None:
                self.keys[..., : old_k.shape[2], :] = old_k
                self.values[..., : old_v.shape[2], :] = old_v
        start = self.table.first_slot
        L = keys.shape[2]
        self.keys[..., start : start + L, :] = keys
        self.values[..., start : start + L, :] = values
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise ValueError("The overlapped loop's KV cache does not support sliding windows.")
        dtype = self.keys.dtype if self.additive and self.keys is not None else None
        return self.table.mask(N, dtype)

    def to_kv_cache(self, slots: np.ndarray) -> KVCache:
        """A plain ``KVCache`` holding the rows of ``slots``, in order."""
        c = KVCache()
        if self.keys is not None and slots.size:
            idx = mx.array(slots.astype(np.int32))
            c.keys = mx.take(self.keys, idx, axis=2)
            c.values = mx.take(self.values, idx, axis=2)
            c.offset = int(slots.size)
        return c

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.table.positions

    def is_trimmable(self):
        return False

    def size(self):
        return self.table.capacity

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
