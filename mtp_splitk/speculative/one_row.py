# Copyright © 2026 mtp_splitk contributors

"""One-row passes over a DeviceKVCache on CUDA, through cuDNN's masked kernel.

A DeviceKVCache hands attention a mask for every pass (its buffer holds rows
past the live ones). For one query row MLX's CUDA attention has no kernel
that takes an array mask (its one-query kernel takes none, cuDNN's is kept
for two rows or more) and falls back to separate ops: 56-100 µs a layer
against 10.6-40 without a mask (benchmarks/h200/RUNS.md, run 12a). The draft
model's passes and the MTP head's are one row each. Here such a call goes to
attention with the row twice (and the mask's row twice), which cuDNN takes,
and the first copy comes back; every other call is mlx-lm's own, unchanged.

:func:`install` points the model modules' ``scaled_dot_product_attention`` (and
those of the patch's copies of their attention) at :func:`scaled_dot_product_attention`
(``device_cache.on_device`` calls it); :func:`uninstall` puts mlx-lm's back.
"""

import sys

import mlx.core as mx
from mlx_lm.models import base

from .device_cache import DeviceKVCache

_original = base.scaled_dot_product_attention
FORCE = False  # take the two-row path on any device (tests on the CPU)
# The last mask doubled, (mask, doubled): a forward's layers share one mask.
_doubled = (None, None)


def _applies(queries, cache, mask) -> bool:
    return (
        queries.shape[2] == 1
        and isinstance(cache, DeviceKVCache)
        and isinstance(mask, mx.array)
        and (FORCE or (mx.default_device() == mx.gpu and mx.cuda.is_available()))
    )


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's, but a one-row pass over a DeviceKVCache on CUDA as two rows."""
    if not _applies(queries, cache, mask):
        return _original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    global _doubled
    seen, doubled = _doubled
    if seen is not mask:
        doubled = mx.concatenate([mask, mask], axis=-2)
        _doubled = (mask, doubled)
    out = _original(mx.concatenate([queries, queries], axis=2), keys, values, cache=cache, scale=scale,
                    mask=doubled, sinks=sinks)
    return out[:, :, :1]


def _users():
    # mlx-lm's model modules, and ours that hold copies of their attention (fused, verify_rows).
    return [m for name, m in list(sys.modules.items())
            if name.startswith(("mlx_lm.models.", "mtp_splitk.")) and m is not None and m is not sys.modules[__name__]
            and getattr(m, "scaled_dot_product_attention", None) in (_original, scaled_dot_product_attention)]


def install():
    """Every loaded module that calls base's attention (mlx-lm's model modules and
    the patch's copies of their attention) calls ours."""
    for module in _users():
        module.scaled_dot_product_attention = scaled_dot_product_attention


def uninstall():
    for module in _users():
        module.scaled_dot_product_attention = _original
