# Copyright © 2026 mtp_splitk contributors

"""Gated DeltaNet caches for the overlapped loop: every candidate state kept,
the accepted one chosen on the device.

A recurrent layer (Qwen3-Next's and Qwen3.5's Gated DeltaNet) keeps only its
final state, and which prefix of a verify pass survives is known only from
the pass's own logits. So during the overlapped loop each such layer (its
instance's class swapped, as :mod:`.verify_rows` does) hands a
:class:`DeviceArraysCache` the whole convolution input of the pass and its
recurrent state after every row (:func:`mtp_splitk.gated_delta.rows`: with the
patch on CUDA one launch a pass, the patched decode step's arithmetic; else
mlx-lm's ``gated_delta_update`` a row at a time, a decode step's own); :meth:`commit`
then picks the convolution window and the state at the accepted count, a
lazy array, and step n+1 is built on them before step n is read. Costs M
states a layer in memory (M = k+1 rows).
"""

from typing import Callable, List

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5, qwen3_next
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.gated_delta import normalize_qk

from .. import gated_delta
from .verify_rows import swap_classes


class DeviceArraysCache(ArraysCache):
    """An ``ArraysCache`` (conv window, recurrent state) whose next contents
    are chosen on the device: a swapped layer stores its pass's candidates
    (:meth:`hold`), :meth:`commit` keeps the state after a lazy count of rows.
    The last two passes' candidates stay, so that :meth:`to_arrays_cache` can
    end at any row of the step the host read last."""

    def __init__(self, source: ArraysCache, offset: int):
        super().__init__(len(source.cache))
        self.cache = list(source.cache)
        self.offset = mx.array(offset, mx.int32)  # rows fed so far
        self._held = None
        self._passes = []  # (offset before, conv window before, state before, conv input, states)

    def hold(self, conv_input: mx.array, states: mx.array):
        self._held = (conv_input, states)  # states: [rows, ...] after each row

    def commit(self, kept):
        """Keep the first ``kept`` rows (an int or a lazy int32 array, >= 1) of
        the pass that :meth:`hold` described."""
        conv_input, states = self._held
        kept = mx.array(kept, mx.int32) if isinstance(kept, int) else kept.astype(mx.int32)
        self._passes = self._passes[-1:] + [(self.offset, *self.cache, conv_input, states)]
        self.cache = _chosen(conv_input, states, kept)
        self.offset = self.offset + kept
        self._held = None

    def to_arrays_cache(self, length: int) -> ArraysCache:
        """A plain ``ArraysCache`` holding the state after the first ``length``
        rows (a host sync: the loop's end)."""
        c = ArraysCache(len(self.cache))
        c.cache = list(self.cache)
        for start, conv, state, conv_input, states in reversed(self._passes):
            rows = length - start.item()
            if rows == 0:
                c.cache = [conv, state]
            elif 0 < rows <= states.shape[0]:
                c.cache = _chosen(conv_input, states, mx.array(rows, mx.int32))
            else:
                continue
            break
        return c

    def reserve(self, positions: int):
        pass  # fixed size

    @property
    def state(self) -> List[mx.array]:
        """Every array a pass reads and :meth:`commit` replaces (offset, window,
        state, the last two passes' candidates), flat, as ``DeviceKVCache.state``
        holds its offset: what the compiled step takes in and out."""
        return [self.offset, *self.cache] + [a for entry in self._passes for a in entry]

    @state.setter
    def state(self, arrays: List[mx.array]):
        self.offset, self.cache = arrays[0], list(arrays[1:3])
        rest = arrays[3:]
        self._passes = [tuple(rest[i : i + 5]) for i in range(0, len(rest), 5)]


def _chosen(conv_input, states, kept):
    """The conv window and the recurrent state after ``kept`` rows."""
    B, rows, C = conv_input.shape
    conv = mx.slice(conv_input, kept[None], (1,), (B, rows - states.shape[0], C))
    return [conv, mx.take(states, kept - 1, axis=0)]


def _verify_call(self, inputs: mx.array, mask=None, cache=None) -> mx.array:
    """mlx-lm's Gated DeltaNet ``__call__`` (Qwen3-Next's and Qwen3.5's, which
    differ only in their input projections) for a :class:`DeviceArraysCache`:
    the same arithmetic, the candidates held instead of the final state."""
    if not isinstance(cache, DeviceArraysCache) or mask is not None:
        return type(self).__mro__[1].__call__(self, inputs, mask, cache)
    B, S, _ = inputs.shape
    if hasattr(self, "in_proj_qkvz"):  # Qwen3-Next
        q, k, v, z, b, a = self.fix_query_key_value_ordering(
            self.in_proj_qkvz(inputs), self.in_proj_ba(inputs)
        )
        qkv = mx.concatenate(
            [q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], axis=-1
        )
    else:  # Qwen3.5
        qkv = self.in_proj_qkv(inputs)
        z = self.in_proj_z(inputs).reshape(B, S, self.num_v_heads, self.head_v_dim)
        b = self.in_proj_b(inputs)
        a = self.in_proj_a(inputs)
    conv_state = cache[0]
    if conv_state is None:
        conv_state = mx.zeros((B, self.conv_kernel_size - 1, self.conv_dim), dtype=inputs.dtype)
    conv_input = mx.concatenate([conv_state, qkv], axis=1)
    conv_out = nn.silu(self.conv1d(conv_input))
    q, k, v = [
        t.reshape(B, S, h, d)
        for t, h, d in zip(
            mx.split(conv_out, [self.key_dim, 2 * self.key_dim], -1),
            [self.num_k_heads, self.num_k_heads, self.num_v_heads],
            [self.head_k_dim, self.head_k_dim, self.head_v_dim],
        )
    ]
    q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)
    # Every row's state kept: one launch where the patch's kernel takes it, else row by row.
    out, states = gated_delta.rows(q, k, v, a, b, self.A_log, self.dt_bias, cache[1], not self.training)
    cache.hold(conv_input, states)
    out = self.norm(out, z)
    return self.out_proj(out.reshape(B, S, -1))


def _subclass(cls):
    return type(cls.__name__, (cls,), {"__call__": _verify_call, "__module__": __name__})


_SWAPS = {
    cls: _subclass(cls) for cls in (qwen3_next.Qwen3NextGatedDeltaNet, qwen3_5.GatedDeltaNet)
}


def known(model: nn.Module) -> bool:
    """Whether every recurrent layer of ``model`` is one this module takes
    (a layer with a convolution and a decay, ``A_log``, is recurrent)."""
    return all(
        type(m) in _SWAPS or type(m) in _SWAPS.values()
        for _, m in model.named_modules()
        if hasattr(m, "A_log") and hasattr(m, "conv1d")
    )


def swap_layers(model: nn.Module) -> Callable[[], None]:
    """Route ``model``'s Gated DeltaNet layers through :func:`_verify_call`
    (instances' classes swapped); returns the function that undoes it."""
    return swap_classes([model], _SWAPS)
