# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk convert``: mlx-lm's conversion, keeping the MTP head.

``mlx_lm.convert`` writes the target (its ``sanitize`` drops the MTP layer).
We then rebuild the head from the source checkpoint's MTP tensors, cast and
quantize it as the conversion did the target (same dtype rule, same group
size / bits / mode, the target's own quantization predicate or the chosen
mixed recipe, seeing the layers' stored paths), and add it to the output as
``mtp.safetensors`` with entries in ``model.safetensors.index.json``, so
:func:`mtp_splitk.mtp.load` finds it and stock ``mlx_lm.load`` still loads
the target unchanged.

The source is loaded for the conversion with every MTP tensor dropped
(:func:`~.loading.dropping_mtp_keys`): mlx-lm's own sanitize drops them only
from some checkpoints (DeepSeek-V3's at index 61 only, Qwen3-Next's only
from raw Hugging Face tensors), and its strict load refuses the others.
"""

import argparse
import json
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
from mlx.utils import tree_map_with_path
from mlx_lm.convert import (
    MODEL_CONVERSION_DTYPES,
    QUANT_RECIPES,
    mixed_quant_predicate_builder,
)
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import (
    load_config,
    load_model,
    save_config,
    upload_to_hub,
)

from ..compat import get_classes
from .families import family_for, model_module, model_text_args
from .loading import (
    MTP_SHARD,
    _quantize_stored,
    dropping_mtp_keys,
    missing_weights_error,
    mtp_tensors,
    quantize_head,
    read_weights,
    resolve,
    stored_tensors,
)


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: str = "affine",
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    quant_predicate: Optional[Union[Callable, str]] = None,
    trust_remote_code: bool = False,
) -> Path:
    """Convert ``hf_path`` like ``mlx_lm.convert.convert`` (same arguments,
    minus ``dequantize``) and keep its MTP head. Returns the output path.

    Raises ``ValueError`` before converting anything when the source has no
    MTP weights or its family has no known MTP layout.
    """
    source = resolve(hf_path, revision)
    config = load_config(source)
    module = model_module(config)
    family = family_for(module)
    model_class, args_class = get_classes(config)
    # Lazy: only its args are read.
    args = model_text_args(model_class(args_class.from_dict(config)))
    source_weights = read_weights(source)
    stored = mtp_tensors(family, args, source_weights)
    if not stored:
        raise missing_weights_error(family, args, hf_path)

    with dropping_mtp_keys():
        mlx_lm_convert(
            str(source),
            mlx_path,
            quantize=quantize,
            q_group_size=q_group_size,
            q_bits=q_bits,
            q_mode=q_mode,
            dtype=dtype,
            quant_predicate=quant_predicate,
            trust_remote_code=trust_remote_code,
        )
    out = Path(mlx_path)
    target, out_config = load_model(out, lazy=True)
    args = model_text_args(target)

    head = family.build(module, args)
    tensors = family.sanitize(module, args, stored, raw=family.is_raw(source_weights))
    if any(k.endswith(".scales") for k in tensors):  # a source already quantized (MLX's)
        _quantize_stored(head, family, args, tensors, config.get("quantization") or {})
    head.load_weights(list(tensors.items()), strict=True)

    # The dtype rule of mlx_lm.convert.
    if dtype is None:
        dtype = config.get("torch_dtype", None)
    if dtype is None and (text_config := config.get("text_config", None)):
        dtype = text_config.get("dtype", None)
    if dtype in MODEL_CONVERSION_DTYPES:
        cast = getattr(target, "cast_predicate", lambda _: True)
        to = getattr(mx, dtype)
        head.update(
            tree_map_with_path(
                lambda k, v: (
                    v.astype(to)
                    if cast(family.stored_key(k, args))
                    and mx.issubdtype(v.dtype, mx.floating)
                    else v
                ),
                head.parameters(),
            )
        )

    if quantize:
        quantization = out_config["quantization"]
        if isinstance(quant_predicate, str):
            quant_predicate = mixed_quant_predicate_builder(
                quant_predicate, target, quantization["group_size"]
            )
        chosen = quantize_head(head, family, args, target, quantization, quant_predicate)
        if chosen:
            _record_quantization(out, chosen)

    _write_shard(out, stored_tensors(head, family, args))
    if upload_repo is not None:
        upload_to_hub(out, upload_repo)
    return out


def _record_quantization(out: Path, chosen: dict):
    """Per-layer choices go into config.json as mlx-lm records them."""
    config = load_config(out)
    config["quantization"].update(chosen)
    save_config(
        config,
        out / "config.json",
        keep_vision_config="vision_config" in config,
    )


def _write_shard(out: Path, tensors: dict):
    mx.save_safetensors(str(out / MTP_SHARD), tensors, metadata={"format": "mlx"})
    index_path = out / "model.safetensors.index.json"
    with open(index_path) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    weight_map.update({k: MTP_SHARD for k in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    metadata = index.setdefault("metadata", {})
    metadata["total_size"] = metadata.get("total_size", 0) + sum(
        v.nbytes for v in tensors.values()
    )
    with open(index_path, "w") as f:
        json.dump(index, f, indent=4)


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``mlx_lm.convert`` (without ``--dequantize``)."""
    parser.add_argument(
        "--hf-path",
        "--model",
        type=str,
        required=True,
        help="Local path or Hugging Face repo of the source checkpoint "
        "(with its MTP weights).",
    )
    parser.add_argument(
        "--mlx-path", type=str, default="mlx_model", help="Where to save the model."
    )
    parser.add_argument(
        "-q", "--quantize", action="store_true", help="Quantize the model and head."
    )
    parser.add_argument("--q-group-size", type=int, default=None)
    parser.add_argument("--q-bits", type=int, default=None)
    parser.add_argument(
        "--q-mode",
        type=str,
        default="affine",
        choices=["affine", "mxfp4", "nvfp4", "mxfp8"],
    )
    parser.add_argument(
        "--quant-predicate",
        choices=QUANT_RECIPES,
        type=str,
        default=None,
        help="Mixed-bit quantization recipe.",
    )
    parser.add_argument(
        "--dtype",
        choices=MODEL_CONVERSION_DTYPES,
        type=str,
        default=None,
        help="dtype of the non-quantized parameters (default: the config's).",
    )
    parser.add_argument("--upload-repo", type=str, default=None)
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


def convert_main(args: argparse.Namespace) -> Path:
    """Run :func:`convert` with arguments parsed by :func:`add_convert_args`."""
    return convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_group_size=args.q_group_size,
        q_bits=args.q_bits,
        q_mode=args.q_mode,
        dtype=args.dtype,
        upload_repo=args.upload_repo,
        revision=args.revision,
        quant_predicate=args.quant_predicate,
        trust_remote_code=args.trust_remote_code,
    )
