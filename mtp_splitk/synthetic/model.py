# Copyright © 2026 mtp_splitk contributors

"""mlx-lm's own model for a synthetic config, built lazily, cast and quantized
the way ``mlx_lm.convert`` does it.

MLX arrays are not computed until evaluated, so even a 30B-parameter model
costs nothing to *describe*: tiny and small models are evaluated
(:func:`evaluated_tensors`), real shapes only lend their shapes and dtypes to
:func:`mtp_splitk.synthetic.packed.packed_tensors`.
"""

import contextlib
import copy
import io
from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from ..ops import resolve_mode
from .safetensors import Tensor, tensor_from_array


def lazy_model(config: dict, quantization: Optional[dict] = None):
    """mlx-lm's model for ``config``, cast and quantized the way convert does it.

    Nothing is computed: the parameters are lazy MLX arrays whose shapes and
    dtypes are those a converted checkpoint stores. Returns (model, config),
    the config with mlx-lm's ``quantization`` entries added.
    """
    # Lazy: mlx-lm takes a second to import, and the CLI imports this package.
    from mlx_lm.convert import MODEL_CONVERSION_DTYPES

    from ..compat import get_classes

    model_class, args_class = get_classes(config)
    model = model_class(args_class.from_dict(copy.deepcopy(config)))

    # Cast floating parameters to the checkpoint dtype, as convert does.
    dtype = config.get("torch_dtype")
    if dtype in MODEL_CONVERSION_DTYPES:
        dtype = getattr(mx, dtype)
        keep = getattr(model, "cast_predicate", lambda _: True)

        def cast(path, v):
            if keep(path) and mx.issubdtype(v.dtype, mx.floating):
                return v.astype(dtype)
            return v

        model.update(tree_map_with_path(cast, model.parameters()))

    return quantize(model, config, quantization)


def quantize(model, config: dict, quantization: Optional[dict]):
    """``mlx_lm.utils.quantize_model`` as convert runs it, with MLX's defaults
    for a missing group size or bit width; returns (model, config)."""
    # Lazy: mlx-lm takes a second to import, and the CLI imports this package.
    from mlx_lm.utils import quantize_model

    if quantization is None:
        return model, config
    mode = quantization.get("mode", "affine")
    group_size, bits = resolve_mode(
        mode, quantization.get("group_size"), quantization.get("bits")
    )
    # quantize_model reports bits per weight on stdout; a library stays quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        return quantize_model(model, config, group_size, bits, mode=mode)


def evaluated_tensors(model) -> List[Tensor]:
    """Every stored tensor of a model, with its evaluated values."""
    params = tree_flatten(model.parameters())
    mx.eval([v for _, v in params])
    return [tensor_from_array(k, v) for k, v in params]
