# Copyright © 2026 mtp_splitk contributors

"""Random MTP weights for a synthetic target, in the family's own key names.

:func:`mtp_weights` returns the tensors of one MTP layer for a target
described by its mlx-lm ``config.json`` dict, in mlx-lm's converted form
(stacked experts, ones for norms) and quantized like the target when the
config says the target is. :func:`write_mtp_model` passes them to
:func:`~mtp_splitk.synthetic.write_model` as ``extra_weights`` (they can also
be saved as ``mtp.safetensors`` next to the target);
:func:`mtp_splitk.mtp.load` then loads them like any converted checkpoint.

Nothing is generated in floating point and then quantized: packed weights
are random bits and their scales (and biases) come from quantizing one
sample group, so real-size heads (hundreds of experts) cost only their
packed size.
"""

from typing import Dict, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .configs import DEFAULT_QUANTIZATION
from .writer import write_model


def mtp_weights(
    config: dict,
    *,
    seed: int = 0,
    quantize: bool = True,
    dtype: Optional[mx.Dtype] = None,
) -> Dict[str, mx.array]:
    """Random tensors of one MTP layer for the target described by ``config``.

    Args:
        config: the target's mlx-lm ``config.json`` as a dict. Its
          ``quantization`` entry (if any, and if ``quantize``) decides how the
          head is quantized, with the target family's own predicate.
        seed: seeds the values; equal seeds give equal tensors.
        quantize: quantize like the target (when the target is quantized).
        dtype: floating-point dtype; default the config's ``torch_dtype``,
          else float32.

    Returns:
        stored key -> tensor, e.g. ``model.layers.2.eh_proj.weight`` for a
        two-layer DeepSeek-V3.
    """
    # Lazy: the MTP runtime imports mlx-lm (a second), and the CLI imports this package.
    from ..mtp.loading import stored_tensors

    head, family, args = mtp_head(config, quantize)
    if dtype is None:
        dtype = getattr(mx, str(config.get("torch_dtype", "float32")), mx.float32)

    modules = dict(head.named_modules())
    params = dict(tree_flatten(head.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    values = {}
    for key, name in zip(keys, sorted(params)):
        if name.endswith((".scales", ".biases")):
            continue  # generated with their packed weight
        base = name.rsplit(".", 1)[0]
        if params[name].dtype == mx.uint32:
            values.update(_random_packed(base, modules[base], params, key))
        else:
            values[name] = _random_float(name, params[name], key, dtype)
    head.update(tree_unflatten(list(values.items())))
    return stored_tensors(head, family, args)


def mtp_head(config: dict, quantize: bool = True):
    """The family's MTP head for the target ``config`` (its mlx-lm
    ``config.json`` dict), quantized like the target when ``quantize`` and the
    config say so; lazy, nothing computed. Returns (head, family, text args)."""
    # Lazy: the MTP runtime imports mlx-lm (a second), and the CLI imports this package.
    from ..compat import get_classes
    from ..mtp.families import family_for, model_module, model_text_args
    from ..mtp.loading import quantize_head

    model_class, args_class = get_classes(config)
    module = model_module(config)
    family = family_for(module)
    # Built only for its args and quant_predicate: MLX arrays are lazy, so the
    # target's random initialisation is never computed or stored.
    target = model_class(args_class.from_dict(config))
    args = model_text_args(target)
    head = family.build(module, args)
    quantization = config.get("quantization") if quantize else None
    quantize_head(head, family, args, target, quantization)
    return head, family, args


def _random_float(name: str, w: mx.array, key: mx.array, dtype: mx.Dtype) -> mx.array:
    if w.ndim == 1 and "norm" in name:
        return mx.ones(w.shape, dtype=dtype)
    if w.ndim == 1:  # biases, DeepSeek's router score correction
        return mx.zeros(w.shape, dtype=w.dtype if w.dtype == mx.float32 else dtype)
    return (mx.random.normal(w.shape, key=key) * w.shape[-1] ** -0.5).astype(dtype)


def _random_words(shape, key) -> mx.array:
    """Uniformly random uint32 words (two 16-bit draws: randint is int32)."""
    halves = mx.random.randint(0, 1 << 16, (2, *shape), key=key).astype(mx.uint32)
    return (halves[0] << 16) | halves[1]


def _random_packed(base: str, layer, params, key) -> Dict[str, mx.array]:
    """Random bits for a packed weight; scales (and biases) from quantizing
    one sample group, so every mode gets valid scales in its own encoding."""
    w, scales = params[base + ".weight"], params[base + ".scales"]
    in_dims = w.shape[-1] * 32 // layer.bits
    wkey, skey = mx.random.split(key)
    sample = mx.random.normal((1, layer.group_size), key=skey) * in_dims**-0.5
    if scales.dtype != mx.uint8:
        sample = sample.astype(scales.dtype)
    _, s, *b = mx.quantize(sample, layer.group_size, layer.bits, mode=layer.mode)
    out = {
        base + ".weight": _random_words(w.shape, wkey),
        base + ".scales": mx.full(scales.shape, s.reshape(()), dtype=scales.dtype),
    }
    if b:
        biases = params[base + ".biases"]
        out[base + ".biases"] = mx.full(
            biases.shape, b[0].reshape(()), dtype=biases.dtype
        )
    return out


def write_mtp_model(
    path,
    family: str,
    size: str = "tiny",
    quantization: Optional[dict] = DEFAULT_QUANTIZATION,
    seed: int = 0,
    *,
    mtp_seed: Optional[int] = None,
    quantize_mtp: bool = True,
    **kwargs,
):
    """A synthetic model directory (:func:`~mtp_splitk.synthetic.write_model`,
    whose keyword arguments ``kwargs`` are) with random MTP weights stored in
    the target's shards, as in a Hugging Face checkpoint. ``quantization``
    defaults to the synthetic writer's (``None``: unquantized);
    ``quantize_mtp=False`` stores the head in floating point (it is then
    quantized like the target at load time). Returns the path."""
    mtp_seed = seed if mtp_seed is None else mtp_seed

    def extra(config):  # the final config: dtype and quantization entries
        return mtp_weights(config, seed=mtp_seed, quantize=quantize_mtp)

    return write_model(path, family, size, quantization, seed, extra_weights=extra, **kwargs)
