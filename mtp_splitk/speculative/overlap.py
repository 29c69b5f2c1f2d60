# Copyright © 2026 mtp_splitk contributors

"""Submitting a verify pass to the device in pieces, while its graph is built."""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn


class _Started:
    """A decoder layer whose output is submitted to the device as soon as
    its graph is built (see :func:`layers_started_early`)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        mx.async_eval([a for a in outs if isinstance(a, mx.array)])
        return out

    def __getattr__(self, name):
        # Models read attributes of their layers in the forward (sliding or
        # linear-attention flags): those of the wrapped layer.
        return getattr(self.layer, name)


@contextmanager
def layers_started_early(model: nn.Module, every: int):
    """Within the block, every ``every``-th decoder layer of ``model``
    submits its output as soon as its graph is built.

    A verify pass must wait for the previous verdict, so its graph cannot be
    built while the device runs the previous pass (plain decoding hides its
    graph building that way). Submitting the pass in pieces lets the device
    run the first layers while the host builds the rest. Values are
    unchanged: only when the work is submitted. ``every <= 0``, or a model
    without a ``layers`` list, leaves the model alone.

    Off by default: it slowed the patched loop on the H200
    (run 6 in ``benchmarks/h200/RUNS.md``).
    """
    # The backbone's own list (a model's ``layers`` property may return a copy).
    text = getattr(model, "language_model", model)
    layers = getattr(getattr(text, "model", None), "layers", None)
    if not isinstance(layers, list):
        layers = getattr(model, "layers", None)
    if every <= 0 or not isinstance(layers, list):
        yield
        return
    # The last layer is left alone: the caller evaluates the whole pass.
    chosen = list(range(every - 1, len(layers) - 1, every))
    originals = [layers[i] for i in chosen]
    for i in chosen:
        layers[i] = _Started(layers[i])
    try:
        yield
    finally:
        for i, layer in zip(chosen, originals):
            layers[i] = layer
