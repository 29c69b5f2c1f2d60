# Copyright © 2026 mtp_splitk contributors

"""Route mlx-lm's quantized matmuls through ``mtp_splitk.ops``.

``enable()`` replaces, on the classes themselves, every method on mlx-lm's
decode and verify path that calls ``mx.quantized_matmul`` or
``mx.gather_qmm``, so models that are already loaded switch too and
``disable()`` puts the original function objects back. On the CPU the ops
fall back to MLX's, so a patched model computes bit for bit what the
unpatched one does.

Each replacement is a copy of the original method's body with only
``mx.quantized_matmul`` / ``mx.gather_qmm`` changed to ``ops.quantized_matmul``
/ ``ops.gather_qmm`` called with ``derivatives=self.training`` (MLX's
derivatives for a layer in training mode only: they cost inference time).
tests/test_patch.py compares the two syntax trees, so an
mlx or mlx-lm release that changes one of these methods fails the tests
instead of being silently overridden with stale logic.

What is installed is a router around the copy (``routing``): the first
call of a layer with a given input shape runs the copy and remembers whether
MLX's op took it; later calls MLX takes go straight to the original method,
so a patched call costs the host almost nothing over MLX's own. Calls inside
``ops.recording()`` and calls after ``ops.clear_cache()`` or a change of the
split policy or device run the copy, which looks the ops up on the module at
call time (a spy or a newer op is picked up without re-patching).
"""

import contextlib
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import sum_gradients
from mlx_lm.models import mla, switch_layers

from . import fused, gated_delta, ops, routing

# -- copies of the originals, matmul swapped ------------------------------------------------


def _quantized_linear_call(self, x):
    # mlx.nn.QuantizedLinear.__call__
    x = ops.quantized_matmul(
        x,
        self["weight"],
        scales=self["scales"],
        biases=self.get("biases"),
        transpose=True,
        group_size=self.group_size,
        bits=self.bits,
        mode=self.mode,
        derivatives=self.training,
    )
    if "bias" in self:
        x = x + self["bias"]
    return x


def _direct_quantized_linear(layer, call, x):
    """After a call the kernel took: the same call for that input without the
    ops (the kernel op itself), while the layer keeps its mode and x its dtype
    (the kernel op was built for both: else the copy, which asks the ops)."""
    kernel, training, dtype = call.kernel, layer.training, x.dtype
    affine = "biases" in layer

    def run(self, x):
        if self.training is not training or x.dtype != dtype:
            return _quantized_linear_call(self, x)
        if affine:
            y = kernel(x, self["weight"], self["scales"], self["biases"])
        else:
            y = kernel(x, self["weight"], self["scales"])
        return y + self["bias"] if "bias" in self else y

    return run


def _quantized_embedding_as_linear(self, x):
    # mlx.nn.QuantizedEmbedding.as_linear: the LM head of tied-embedding models
    return ops.quantized_matmul(
        x,
        self["weight"],
        scales=self["scales"],
        biases=self.get("biases"),
        transpose=True,
        group_size=self.group_size,
        bits=self.bits,
        mode=self.mode,
        derivatives=self.training,
    )


def _quantized_switch_linear_call(self, x, indices, sorted_indices=False):
    # mlx_lm.models.switch_layers.QuantizedSwitchLinear.__call__: the experts
    # of SwitchGLU / SwitchMLP, with sorted (prefill, verify) and unsorted
    # (decode) indices, nvfp4 global scales and per-expert biases.
    x = ops.gather_qmm(
        x,
        self["weight"],
        self["scales"],
        self.get("biases"),
        rhs_indices=indices,
        transpose=True,
        group_size=self.group_size,
        bits=self.bits,
        mode=self.mode,
        global_scale=self.global_scale,
        sorted_indices=sorted_indices,
        derivatives=self.training,
    )
    if "bias" in self:
        x = x + mx.expand_dims(self["bias"][indices], -2)
    return x


def _quantized_multi_linear_call(self, x, transpose=True):
    # mlx_lm.models.mla.QuantizedMultiLinear.__call__: per-head MLA
    # projections (embed_q, unembed_out) of DeepSeek-V3 style attention.
    return ops.quantized_matmul(
        x,
        self["weight"],
        scales=self["scales"],
        biases=self.get("biases"),
        transpose=transpose,
        group_size=self.group_size,
        bits=self.bits,
        mode=self.mode,
        derivatives=self.training,
    )


def _quantized_all_to_sharded_call(self, x: mx.array) -> mx.array:
    # mlx.nn.QuantizedAllToShardedLinear.__call__ (tensor parallel, column split)
    # Aggregate the gradients coming from each shard
    x = sum_gradients(self.group)(x)

    x = ops.quantized_matmul(
        x,
        self["weight"],
        scales=self["scales"],
        biases=self.get("biases"),
        transpose=True,
        group_size=self.group_size,
        bits=self.bits,
        mode=self.mode,
        derivatives=self.training,
    )
    if "bias" in self:
        x = x + self["bias"]
    return x


def _quantized_sharded_to_all_call(self, x: mx.array) -> mx.array:
    # mlx.nn.QuantizedShardedToAllLinear.__call__ (tensor parallel, row split):
    # the partial products are summed across the group before the bias.
    x = ops.quantized_matmul(
        x,
        self["weight"],
        scales=self["scales"],
        biases=self.get("biases"),
        transpose=True,
        group_size=self.group_size,
        bits=self.bits,
        mode=self.mode,
        derivatives=self.training,
    )
    x = mx.distributed.all_sum(x, group=self.group)
    if "bias" in self:
        x = x + self["bias"]
    return x


# (class, attribute, replacement): the copy, which enable() installs inside its router
PATCHES = (
    (nn.QuantizedLinear, "__call__", _quantized_linear_call),
    (nn.QuantizedEmbedding, "as_linear", _quantized_embedding_as_linear),
    (switch_layers.QuantizedSwitchLinear, "__call__", _quantized_switch_linear_call),
    (mla.QuantizedMultiLinear, "__call__", _quantized_multi_linear_call),
    (nn.QuantizedAllToShardedLinear, "__call__", _quantized_all_to_sharded_call),
    (nn.QuantizedShardedToAllLinear, "__call__", _quantized_sharded_to_all_call),
)
_ROUTERS = {
    _quantized_switch_linear_call: routing.switch_router,
    _quantized_multi_linear_call: routing.multi_router,
}

# Call sites of mx.quantized_matmul / mx.gather_qmm in the installed mlx and
# mlx-lm that the patch deliberately leaves alone, keyed by (file relative to
# site-packages, qualified name of the enclosing function). The coverage test
# fails on any call site that is neither patched nor listed here.
OUT_OF_SCOPE = {
    (
        "mlx_lm/models/base.py",
        "quantized_scaled_dot_product_attention",
    ): "attention against a quantized KV cache (--kv-bits): the quantized operand is the "
    "cache, batched per head and multiplied untransposed for the values; not a weight "
    "matmul, and the split-K kernels plan weight shapes only",
    (
        "mlx_lm/models/prism_hadamard_qwen35.py",
        "HadamardQuantizedLinear.__call__",
    ): "one third-party checkpoint format (Hadamard-rotated 2-bit packs for Qwen3.5) "
    "with its own layer class; not a model this project targets or measures",
}

_lock = threading.Lock()
_originals = {}  # (class, attribute) -> the function enable() replaced


def is_enabled() -> bool:
    return bool(_originals)


def enable() -> None:
    """Patch the classes in PATCHES (each replacement inside its router).
    Calling it again changes nothing."""
    with _lock:
        if _originals:
            return
        for cls, name, replacement in PATCHES:
            if name not in vars(cls):
                raise RuntimeError(
                    f"{cls.__module__}.{cls.__qualname__} no longer defines {name}; "
                    "this mtp_splitk does not know this mlx / mlx-lm version."
                )
        for cls, name, replacement in PATCHES:
            original = _originals[(cls, name)] = vars(cls)[name]
            if replacement is _quantized_linear_call:
                routed = routing.router(original, replacement, direct=_direct_quantized_linear)
            else:
                routed = _ROUTERS.get(replacement, routing.router)(original, replacement)
            setattr(cls, name, routed)
        fused.enable()  # attention and MLP blocks: q/k/v and gate/up in one launch each
        gated_delta.enable()  # Gated DeltaNet's recurrence: one launch a pass on CUDA


def disable() -> None:
    """Put back the original methods (the same objects). Safe to call when disabled."""
    with _lock:
        for (cls, name), original in _originals.items():
            setattr(cls, name, original)
        _originals.clear()
        fused.disable()
        gated_delta.disable()


@contextlib.contextmanager
def enabled(on: bool = True):
    """``with enabled():`` patches for the block (``enabled(False)`` runs it
    unpatched), then restores the previous state."""
    was_enabled = is_enabled()
    (enable if on else disable)()
    try:
        yield
    finally:
        (enable if was_enabled else disable)()


# Set by the MTP_SPLITK=1 import hook when this module's own import of mlx_lm
# triggered it (mtp_splitk.enable() before any mlx_lm import): enable now.
_announce = globals().pop("_ENABLE_WHEN_LOADED", None)
if _announce is not None:
    enable()
    print(_announce(), file=sys.stderr)
