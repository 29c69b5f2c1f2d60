# Copyright © 2026 mtp_splitk contributors

"""Fused projections: fewer ops per layer.

Every MLX op costs the GPU a fixed few microseconds, and a decode step of a
7-8B model is hundreds of them, so :func:`linears` runs q, k and v (any 2 or 3
quantized linears of one input) as one launch, :func:`swiglu_mlp` runs
gate and up with ``silu(gate) * up`` as one launch, :func:`switch_glu` the
same over experts (SwitchGLU, on CUDA), and :func:`linear_residual` adds a
block's residual in the o and down projections' launch (on CUDA), from the
layers' weight arrays as they are. Each weight's rows compute exactly what the unfused
split-K kernel computes for them (``plan.plan_multi``); where the planner
declines (the CPU, large M, shapes it does not plan, splits that disagree)
each layer is called as before, so the result is the unfused patched model's,
bit for bit.

:func:`enable` installs, on mlx-lm's attention, MLP and decoder-block classes,
copies of their ``__call__`` with only the projection calls (and the blocks'
residual adds, :func:`residual_call`) swapped for these functions
(tests/test_fused.py compares the syntax trees with the originals');
:func:`disable` puts the original function objects back.
"""

import math
import threading
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import deepseek_v3, llama, mixtral, qwen3, qwen3_moe, switch_layers
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

from . import launch, ops, routing
from . import plan as planner
from .kernel_op import mlx_gather_qmm as _mlx_gather_qmm
from .kernel_op import mlx_quantized_matmul as _mlx_quantized_matmul
from .kernel_op import with_derivatives_of

# -- the fused calls ------------------------------------------------------------------------


def linears(x: mx.array, layers) -> list:
    """``[layer(x) for layer in layers]`` for 2 or 3 layers, in one launch where
    the planner takes them all (``nn.QuantizedLinear`` of one K and quantization)."""
    run = _route(x, layers, _plan_linears)
    return [layer(x) for layer in layers] if run is None else run(x)


def swiglu_mlp(x: mx.array, gate, up) -> mx.array:
    """mlx-lm's ``swiglu(gate(x), up(x))``: on CUDA one launch with the
    activation fused, elsewhere the two projections in one launch, or the
    unfused calls where the planner declines."""
    run = _route(x, (gate, up), _plan_swiglu)
    return swiglu(gate(x), up(x)) if run is None else run(x)


def switch_glu(x: mx.array, indices: mx.array, up, gate, activation, sorted_indices: bool) -> mx.array:
    """mlx-lm's SwitchGLU middle, ``activation(up(x, indices), gate(x, indices))``:
    on CUDA one grouped launch with the activation fused where the planner takes
    the experts (``plan.plan_gather_glu``), else the two calls as mlx-lm makes them."""
    run = _route(x, (gate, up), _plan_switch_glu, indices.shape, sorted_indices, type(activation))
    if run is None:
        return activation(up(x, indices, sorted_indices=sorted_indices),
                          gate(x, indices, sorted_indices=sorted_indices))
    return run(x, indices)


def linear_residual(layer, x: mx.array, residual: Optional[mx.array]) -> mx.array:
    """``residual + layer(x)`` (``layer(x)`` without a residual), the add in the
    kernel's epilogue on CUDA where the planner takes the layer (one launch fewer)."""
    if residual is None:
        return layer(x)
    run = _route(x, (layer,), _plan_residual, residual.shape, residual.dtype)
    return residual + layer(x) if run is None else run(x, residual)


def residual_call(residual: mx.array, module, *args) -> mx.array:
    """``residual + module(*args)``: a block's residual connection, handed to the
    module where its copy below takes it (its last projection adds it)."""
    if type(module).__call__ in _TAKES_RESIDUAL:
        return module(*args, residual=residual)
    return residual + module(*args)


_ROUTES = "_mtp_splitk_fused"  # on a call's first layer: (device, split, ops.generation, {input: run})
_MAX_ROUTES = 64  # inputs remembered per layer (prefill lengths vary)
_UNFUSED = object()


def _route(x, layers, plan, *extra):
    """The fused call for this input and these layers, or None (each layer's
    own call), decided once per input and cached on the first layer like
    patch.py's routes: an input is its shape and x's item size (the planner
    treats bfloat16 and float16 alike), ``extra`` (what else the plan reads),
    plus the layers' identities. (A bias is looked up at each call; a layer's
    weights are assumed to keep their shapes and quantization, as mlx-lm's
    loading does.)"""
    remembered = routing.routes(layers[0], _ROUTES, _MAX_ROUTES)
    training = layers[0].training  # derivatives for training only (kernel_op.py)
    key = (plan, x.shape, x.itemsize, training, *extra, *map(id, layers))
    run = remembered.get(key)
    if run is None:
        run = remembered[key] = plan(x, layers, planner.current_device(), training, *extra) or _UNFUSED
    return None if run is _UNFUSED else run


def _quantization(x, layers, fewest=2):
    """(M, K, group_size, bits, mode) when the kernels can take all the layers
    (``fewest`` to MAX_FUSED of them) together (nn.QuantizedLinear, 2-D weights,
    one K, quantization and scales type, biases in the scales' type), else None."""
    if not fewest <= len(layers) <= planner.MAX_FUSED or any(type(l) is not nn.QuantizedLinear for l in layers):
        return None
    first = layers[0]
    mode = first.mode
    group_size, bits = ops.resolve_mode(mode, first.group_size, first.bits)
    words, scales_type, affine = first["weight"].shape[-1], first["scales"].dtype, "biases" in first
    for layer in layers:
        w, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
        if (
            (layer.mode, layer.group_size, layer.bits) != (mode, first.group_size, first.bits)
            or w.ndim != 2
            or w.shape[1] != words
            or scales.dtype != scales_type
            or (biases is not None) != affine
            or (biases is not None and biases.dtype != scales_type)
        ):
            return None
    K = words * 32 // bits
    if x.shape[-1] != K:
        return None  # the layers' own calls raise MLX's error
    return math.prod(x.shape[:-1]), K, group_size, bits, mode


def _plan_linears(x, layers, device, derivatives):
    found = _quantization(x, layers)
    if found is None:
        return None
    M, K, group_size, bits, mode = found
    Ns = tuple(l["weight"].shape[0] for l in layers)
    plan = planner.plan_multi(M, Ns, K, bits, group_size, mode, x.dtype, device)
    if plan is None:
        return None
    op = _multi_op(plan, M, K, x.shape[:-1], group_size, bits, mode, "biases" in layers[0], derivatives)
    calls = [ops.Call("quantized_matmul", M, p.N, p.K, p) for p in plan.members]

    def run(x):
        for call in calls:  # to ops.recording() blocks: one call per weight
            ops.record(call)
        ys = op(x, *_parameters(layers))
        return [y + l["bias"] if "bias" in l else y for y, l in zip(ys, layers)]

    return run


def _plan_swiglu(x, layers, device, derivatives):
    found = _quantization(x, layers)
    if found is None:
        return None
    M, K, group_size, bits, mode = found
    gate, up = layers
    N = gate["weight"].shape[0]
    affine = "biases" in gate
    # A bias is added before the activation: the activation cannot be fused then.
    plain = "bias" not in gate and "bias" not in up and up["weight"].shape[0] == N
    plan = planner.plan_glu(M, N, K, bits, group_size, mode, x.dtype, device) if plain else None
    fused = _plan_linears(x, layers, device, derivatives)
    if plan is None:
        return None if fused is None else lambda x: swiglu(*fused(x))
    op = _glu_op(plan, M, K, x.shape[:-1], group_size, bits, mode, affine, derivatives)
    calls = [ops.Call("quantized_matmul", M, p.N, p.K, p) for p in plan.members]

    def run(x):
        if "bias" in gate or "bias" in up:  # added since: the activation cannot be fused
            return swiglu(*fused(x))
        for call in calls:
            ops.record(call)
        return op(x, *_parameters(layers))

    return run


def _plan_residual(x, layers, device, derivatives, rshape, rdtype):
    """One QuantizedLinear (no bias) with the residual added in its epilogue, where
    ``plan.plan_dense`` plans the layer's own call on CUDA: the run, or None."""
    (layer,) = layers
    found = _quantization(x, layers, fewest=1)
    if found is None or "bias" in layer or rdtype != x.dtype:
        return None
    M, K, group_size, bits, mode = found
    N = layer["weight"].shape[0]
    if tuple(rshape) != (*x.shape[:-1], N):
        return None  # MLX's add says what is wrong
    plan = planner.plan_dense(M, N, K, bits, group_size, mode, x.dtype, device)
    if plan is None or plan.backend != "cuda":
        return None
    op = _residual_op(plan, M, K, x.shape[:-1], group_size, bits, mode, "biases" in layer, derivatives)
    call = ops.Call("quantized_matmul", M, N, K, plan)

    def run(x, residual):
        if "bias" in layer:  # added since: it comes before the residual
            return residual + layer(x)
        ops.record(call)
        return op(x, *_parameters(layers), residual)

    return run


def fusable_switch_glu(gate, up, activation) -> bool:
    """Whether SwitchGLU's gate and up can share one grouped launch: mlx-lm's
    SwiGLU (``activation``, a class), QuantizedSwitchLinear of one shape and
    quantization, no bias, no global scale."""
    if activation is not switch_layers.SwiGLU or any(
        type(l) is not switch_layers.QuantizedSwitchLinear
        or "bias" in l
        or getattr(l, "global_scale", None) is not None
        for l in (gate, up)
    ):
        return False
    return ("biases" in up) == ("biases" in gate) and all(
        (up.mode, up.group_size, up.bits) == (gate.mode, gate.group_size, gate.bits)
        and up[name].shape == gate[name].shape and up[name].dtype == gate[name].dtype
        for name in ("weight", "scales") + (("biases",) if "biases" in gate else ())
    )


def _plan_switch_glu(x, layers, device, derivatives, ishape, sorted_indices, activation):
    """SwitchGLU's gate and up (QuantizedSwitchLinear of one shape and
    quantization, no bias, no global scale) with mlx-lm's SwiGLU, in one grouped
    launch where ``plan.plan_gather_glu`` plans it: the run, or None."""
    gate, up = layers
    if not fusable_switch_glu(gate, up, activation):
        return None
    w = gate["weight"]
    group_size, bits = ops.resolve_mode(gate.mode, gate.group_size, gate.bits)
    if w.ndim != 3 or w.shape[-1] * 32 // bits != x.shape[-1]:
        return None  # the layers' own calls raise MLX's error
    found = ops.grouped_plan((x.shape, x.dtype), (w.shape, w.dtype), ishape, True, group_size, bits, gate.mode,
                             device, ranges="moe_glu_p_range")
    if found is None:
        return None
    plan, x_div, out_shape = found
    E, N, K = w.shape[0], w.shape[1], x.shape[-1]
    if planner.plan_gather_glu(math.prod(ishape), E, N, K, bits, group_size, gate.mode, x.dtype, device) != plan:
        return None
    op = _gather_glu_op(plan, x_div, out_shape, K, group_size, bits, gate.mode, sorted_indices,
                        "biases" in gate, derivatives)
    calls = [ops.Call("gather_qmm", math.prod(ishape), N, K, plan)] * 2  # gate's and up's, for ops.recording()

    def run(x, indices):
        for call in calls:
            ops.record(call)
        return op(x, *_parameters(layers), indices)

    return run


def _parameters(layers):
    params = []
    for layer in layers:
        params += [layer["weight"], layer["scales"]]
        if "biases" in layer:
            params.append(layer["biases"])
    return params


# -- the kernels as ops with MLX's derivatives ----------------------------------------------


def _split(params, affine):
    step = 3 if affine else 2
    return [tuple(params[i : i + step]) + ((None,) if not affine else ()) for i in range(0, len(params), step)]


def _constant(count, affine):
    step = 3 if affine else 2
    return tuple(1 + step * i + j for i in range(count) for j in ((0,) if affine else (0, 1)))


def _multi_op(plan, M, K, lead, group_size, bits, mode, affine, derivatives):
    """``op(x, w0, scales0[, biases0], w1, ...)`` -> [y_i (*lead, N_i)]."""

    def forward(x, *params):
        x = x.reshape(M, K)
        ys = launch.dense_multi(plan, x, _split(params, affine))
        return [y.reshape(*lead, p.N) for y, p in zip(ys, plan.members)]

    def reference(x, *params):
        return [_mlx_quantized_matmul(x, *w, True, group_size, bits, mode) for w in _split(params, affine)]

    return with_derivatives_of(forward, reference, _constant(len(plan.members), affine), derivatives)


def _glu_op(plan, M, K, lead, group_size, bits, mode, affine, derivatives):
    """``op(x, gate's w, scales[, biases], up's ...)`` -> swiglu(g, u) (*lead, N)."""

    def forward(x, *params):
        x = x.reshape(M, K)
        gate, up = _split(params, affine)
        return launch.dense_glu(plan, x, gate, up).reshape(*lead, plan.members[0].N)

    def reference(x, *params):
        gate, up = (_mlx_quantized_matmul(x, *w, True, group_size, bits, mode) for w in _split(params, affine))
        return swiglu(gate, up)

    return with_derivatives_of(forward, reference, _constant(2, affine), derivatives)


def _residual_op(plan, M, K, lead, group_size, bits, mode, affine, derivatives):
    """``op(x, w, scales[, biases], residual)`` -> residual + x @ dequant(w).T (*lead, N)."""
    N = plan.N

    def forward(x, *rest):
        *params, residual = rest
        (w,) = _split(params, affine)
        return launch.dense_residual(plan, x.reshape(M, K), *w, residual.reshape(M, N)).reshape(*lead, N)

    def reference(x, *rest):
        *params, residual = rest
        (w,) = _split(params, affine)
        return residual + _mlx_quantized_matmul(x, *w, True, group_size, bits, mode)

    return with_derivatives_of(forward, reference, _constant(1, affine), derivatives)


def _gather_glu_op(plan, x_div, out_shape, K, group_size, bits, mode, sorted_indices, affine, derivatives):
    """``op(x, gate's w, scales[, biases], up's ..., rhs_indices)`` -> swiglu(g, u)
    over the experts of rhs_indices, shaped ``out_shape``."""

    def forward(x, *rest):
        *params, idx = rest
        gate, up = _split(params, affine)
        idx = idx.flatten()
        if idx.dtype != mx.uint32:
            idx = idx.astype(mx.uint32)
        return launch.gather_glu(plan, x.reshape(-1, K), gate, up, idx, x_div).reshape(out_shape)

    def reference(x, *rest):
        *params, idx = rest
        gate, up = (_mlx_gather_qmm(x, *w, None, idx, True, group_size, bits, mode, sorted_indices=sorted_indices)
                    for w in _split(params, affine))
        return swiglu(gate, up)

    indices = 1 + 2 * (3 if affine else 2)  # after x and the two weights' arrays
    return with_derivatives_of(forward, reference, _constant(2, affine) + (indices,), derivatives)


# -- copies of mlx-lm's methods, projections swapped -----------------------------------------


def _llama_attention_call(
    self,
    x: mx.array,
    mask: Optional[mx.array] = None,
    cache: Optional[Any] = None,
    residual: Optional[mx.array] = None,
) -> mx.array:
    # mlx_lm.models.llama.Attention.__call__
    B, L, D = x.shape

    queries, keys, values = linears(x, (self.q_proj, self.k_proj, self.v_proj))

    # Prepare the queries, keys and values for the attention computation
    queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
    keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

    if cache is not None:
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
    else:
        queries = self.rope(queries)
        keys = self.rope(keys)

    output = scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=self.scale, mask=mask
    )

    output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return linear_residual(self.o_proj, output, residual)


def _qwen3_attention_call(
    self,
    x: mx.array,
    mask: Optional[mx.array] = None,
    cache: Optional[Any] = None,
    residual: Optional[mx.array] = None,
) -> mx.array:
    # mlx_lm.models.qwen3.Attention.__call__ (qwen3_moe's is the same)
    B, L, D = x.shape

    queries, keys, values = linears(x, (self.q_proj, self.k_proj, self.v_proj))

    queries = self.q_norm(queries.reshape(B, L, self.n_heads, -1)).transpose(
        0, 2, 1, 3
    )
    keys = self.k_norm(keys.reshape(B, L, self.n_kv_heads, -1)).transpose(
        0, 2, 1, 3
    )
    values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

    if cache is not None:
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
    else:
        queries = self.rope(queries)
        keys = self.rope(keys)

    output = scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=self.scale, mask=mask
    )
    output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return linear_residual(self.o_proj, output, residual)


def _mixtral_attention_call(
    self,
    x: mx.array,
    mask: Optional[mx.array] = None,
    cache: Optional[Any] = None,
    residual: Optional[mx.array] = None,
) -> mx.array:
    # mlx_lm.models.mixtral.MixtralAttention.__call__
    B, L, D = x.shape

    queries, keys, values = linears(x, (self.q_proj, self.k_proj, self.v_proj))

    # Prepare the queries, keys and values for the attention computation
    queries = queries.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
    keys = keys.reshape(B, L, self.num_key_value_heads, -1).transpose(0, 2, 1, 3)
    values = values.reshape(B, L, self.num_key_value_heads, -1).transpose(
        0, 2, 1, 3
    )

    if cache is not None:
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
    else:
        queries = self.rope(queries)
        keys = self.rope(keys)

    output = scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=self.scale, mask=mask
    )
    output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return linear_residual(self.o_proj, output, residual)


def _mlp_call(self, x, residual: Optional[mx.array] = None) -> mx.array:
    # mlx_lm.models.llama.MLP.__call__ (qwen3's and qwen3_moe's are the same)
    return linear_residual(self.down_proj, swiglu_mlp(x, self.gate_proj, self.up_proj), residual)


def _block_call(
    self,
    x: mx.array,
    mask: Optional[mx.array] = None,
    cache: Optional[Any] = None,
) -> mx.array:
    # mlx_lm.models.llama.TransformerBlock.__call__ (qwen3's and qwen3_moe's are the same)
    h = residual_call(x, self.self_attn, self.input_layernorm(x), mask, cache)
    out = residual_call(h, self.mlp, self.post_attention_layernorm(h))
    return out


def _mixtral_block_call(
    self,
    x: mx.array,
    mask: Optional[mx.array] = None,
    cache: Optional[Any] = None,
) -> mx.array:
    # mlx_lm.models.mixtral.MixtralDecoderLayer.__call__
    h = residual_call(x, self.self_attn, self.input_layernorm(x), mask, cache)
    out = residual_call(h, self.block_sparse_moe, self.post_attention_layernorm(h))
    return out


def _switch_glu_call(self, x, indices) -> mx.array:
    # mlx_lm.models.switch_layers.SwitchGLU.__call__ (qwen3_moe's, mixtral's, deepseek_v3's experts)
    x = mx.expand_dims(x, (-2, -3))

    # When we have many tokens, then sort them to make sure that the access
    # of different experts is in order.
    indices = mx.stop_gradient(indices)
    do_sort = indices.size >= 64
    idx = indices
    inv_order = None
    if do_sort:
        x, idx, inv_order = _gather_sort(x, indices)
    x = self.down_proj(
        switch_glu(x, idx, self.up_proj, self.gate_proj, self.activation, do_sort),
        idx,
        sorted_indices=do_sort,
    )

    if do_sort:
        x = _scatter_unsort(x, inv_order, indices.shape)

    return x.squeeze(-2)


def _deepseek_v3_mlp_call(self, x):
    # mlx_lm.models.deepseek_v3.DeepseekV3MLP.__call__ (dense layers and shared experts)
    down_proj = self.down_proj(swiglu_mlp(x, self.gate_proj, self.up_proj))
    return down_proj


# (class, attribute, replacement). DeepSeek-V3's MLA attention projects
# through low-rank q_a/q_b and kv_a/kv_b, not q/k/v of one input: not fused.
PATCHES = (
    (llama.Attention, "__call__", _llama_attention_call),
    (llama.MLP, "__call__", _mlp_call),
    (qwen3.Attention, "__call__", _qwen3_attention_call),
    (qwen3.MLP, "__call__", _mlp_call),
    (qwen3_moe.Attention, "__call__", _qwen3_attention_call),
    (qwen3_moe.MLP, "__call__", _mlp_call),
    (mixtral.MixtralAttention, "__call__", _mixtral_attention_call),
    (deepseek_v3.DeepseekV3MLP, "__call__", _deepseek_v3_mlp_call),
    (switch_layers.SwitchGLU, "__call__", _switch_glu_call),
    (llama.TransformerBlock, "__call__", _block_call),
    (qwen3.TransformerBlock, "__call__", _block_call),
    (qwen3_moe.Qwen3MoeDecoderLayer, "__call__", _block_call),
    (mixtral.MixtralDecoderLayer, "__call__", _mixtral_block_call),
)
# The copies that take a block's residual (residual_call hands it to them).
_TAKES_RESIDUAL = frozenset((_llama_attention_call, _qwen3_attention_call, _mixtral_attention_call, _mlp_call))

_lock = threading.Lock()
_originals = {}  # (class, attribute) -> the function enable() replaced


def is_enabled() -> bool:
    return bool(_originals)


def enable() -> None:
    """Install the copies in PATCHES. Calling it again changes nothing."""
    with _lock:
        if _originals:
            return
        for cls, name, _ in PATCHES:
            if name not in vars(cls):
                raise RuntimeError(
                    f"{cls.__module__}.{cls.__qualname__} no longer defines {name}; "
                    "this mtp_splitk does not know this mlx-lm version."
                )
        for cls, name, replacement in PATCHES:
            _originals[(cls, name)] = vars(cls)[name]
            setattr(cls, name, replacement)


def disable() -> None:
    """Put back the original methods (the same objects). Safe to call when disabled."""
    with _lock:
        for (cls, name), original in _originals.items():
            setattr(cls, name, original)
        _originals.clear()
