# Copyright © 2026 mtp_splitk contributors

"""Load a target model together with its MTP head.

The target goes through mlx-lm's own loader (``load_model`` and
``load_tokenizer``, i.e. what ``mlx_lm.load`` runs). The MTP tensors are read
from the same directory: from the ``model*.safetensors`` shards of a Hugging
Face checkpoint (the keys mlx-lm's ``sanitize`` drops) and from
``mtp.safetensors``, the extra shard :func:`mtp_splitk.mtp.convert` writes. The
extra shard is deliberately not named ``model*``: mlx-lm globs those, and some
families' ``sanitize`` only drops MTP keys from raw checkpoints (Qwen3-Next)
or only at index 61 (DeepSeek-V3), so a converted checkpoint would otherwise
fail to load with stock mlx-lm.

The head is quantized like the target, with mlx-lm's rules:

- tensors stored quantized (``scales`` present) load as quantized layers with
  the parameters recorded in ``config["quantization"]`` for their stored path,
  else inferred from the shapes (``mlx_lm.utils.infer_quant_config``), exactly
  as ``load_model``'s class predicate does for the target;
- tensors stored in floating point with a quantized target are quantized at
  load time with the target's settings and predicate (as
  ``mlx_lm.utils.quantize_model`` would have done).
"""

import contextlib
import functools
import glob
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.utils as mlx_utils
from mlx.utils import tree_flatten
from mlx_lm.utils import (
    DEFAULT_ALLOW_PATTERNS,
    infer_quant_config,
    load_config,
    load_model,
    load_tokenizer,
)

from ..compat import get_classes
from .families import Family, family_for, model_module, model_text_args
from .heads import MTPHead

#: The extra shard written by :func:`mtp_splitk.mtp.convert`.
MTP_SHARD = "mtp.safetensors"


def resolve(path_or_hf_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory for ``path_or_hf_repo``, downloading if needed.

    Like mlx-lm's download, plus the MTP shard.
    """
    path = Path(path_or_hf_repo)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            path_or_hf_repo,
            revision=revision,
            allow_patterns=DEFAULT_ALLOW_PATTERNS + [MTP_SHARD],
        )
    )


def read_weights(model_path: Path) -> Dict[str, mx.array]:
    """Every tensor of the checkpoint, lazily (nothing is read until used)."""
    files = sorted(glob.glob(str(model_path / "model*.safetensors")))
    files += sorted(glob.glob(str(model_path / MTP_SHARD)))
    weights = {}
    for f in files:
        weights.update(mx.load(f))
    return weights


def mtp_tensors(
    family: Family, args, weights: Dict[str, mx.array]
) -> Dict[str, mx.array]:
    """The first MTP layer's stored tensors, keyed without the layer prefix."""
    prefix = family.prefix(args)
    return {
        k[len(prefix) :]: v
        for k, v in weights.items()
        if k.startswith(prefix) and family.head_key(k[len(prefix) :]) is not None
    }


def missing_weights_error(family: Family, args, where) -> ValueError:
    return ValueError(
        f"No multi-token-prediction weights in {where}: looked for keys starting "
        f"with {family.prefix(args)!r} ({family.describes}) in model*.safetensors "
        f"and {MTP_SHARD}. {family.remedy}"
    )


def _without_mtp():
    """mlx-lm's class lookup, with a sanitize that drops every MTP key first.

    mlx-lm's own sanitize drops them for real checkpoints, but DeepSeek-V3's
    only at index 61 and Qwen3-Next's only for raw Hugging Face tensors; a
    checkpoint of another depth, or a converted one with the MTP tensors in
    its shards, would fail the strict load. The subclass keeps the family's
    name and module so nothing downstream can tell.
    """

    def classes(config):
        model_class, args_class = get_classes(config)
        try:
            family = family_for(model_module(config))
        except ValueError:  # no MTP layout known for this family: nothing to drop
            return model_class, args_class

        class Model(model_class):
            def sanitize(self, weights):
                args = model_text_args(self)
                weights = {
                    k: v for k, v in weights.items() if not family.is_mtp_key(k, args)
                }
                return super().sanitize(weights)

        Model.__name__ = model_class.__name__
        Model.__qualname__ = model_class.__qualname__
        Model.__module__ = model_class.__module__
        return Model, args_class

    return classes


@contextlib.contextmanager
def dropping_mtp_keys():
    """Within the block, ``mlx_lm.utils.load_model`` (what ``mlx_lm.load`` and
    ``mlx_lm.convert`` call) loads with :func:`_without_mtp`'s class lookup,
    so a checkpoint with MTP tensors in its shards loads as the target alone."""
    original = mlx_utils.load_model
    mlx_utils.load_model = functools.partial(original, get_model_classes=_without_mtp())
    try:
        yield
    finally:
        mlx_utils.load_model = original


def drop_mtp_keys_on_load() -> None:
    """:func:`dropping_mtp_keys` for the rest of the process (``MTP_SPLITK=1``
    runs of mlx-lm's own tools); calling it again changes nothing."""
    if not getattr(mlx_utils.load_model, "_drops_mtp_keys", False):
        dropping = functools.partial(mlx_utils.load_model, get_model_classes=_without_mtp())
        dropping._drops_mtp_keys = True
        mlx_utils.load_model = dropping


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
) -> Tuple[nn.Module, MTPHead, Any]:
    """Load ``(model, mtp_head, tokenizer)``.

    The arguments mean what they mean for ``mlx_lm.load``. Raises a
    ``ValueError`` naming the keys it looked for when the checkpoint has no
    MTP weights, and one naming the supported families for any other model.
    """
    model_path = resolve(path_or_hf_repo, revision)
    config = load_config(model_path)
    family_for(model_module(config))  # fail early for unsupported families
    model, config = load_model(
        model_path,
        lazy=True,
        model_config=model_config,
        get_model_classes=_without_mtp(),
        trust_remote_code=trust_remote_code,
    )
    head = load_head(model, config, read_weights(model_path), where=model_path)
    if not lazy:
        mx.eval(model.parameters(), head.parameters())
    tokenizer = load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
    )
    return model, head, tokenizer


def load_head(
    model: nn.Module,
    config: Dict[str, Any],
    weights: Dict[str, mx.array],
    where: Any = "the checkpoint",
) -> MTPHead:
    """Build the MTP head for a loaded ``model`` from checkpoint ``weights``."""
    module = model_module(config)
    family = family_for(module)
    args = model_text_args(model)
    stored = mtp_tensors(family, args, weights)
    if not stored:
        raise missing_weights_error(family, args, where)
    tensors = family.sanitize(module, args, stored, raw=family.is_raw(weights))

    head = family.build(module, args)
    quantization = config.get("quantization")
    if any(k.endswith(".scales") for k in tensors):
        _quantize_stored(head, family, args, tensors, quantization or {})
        head.load_weights(list(tensors.items()), strict=True)
    else:
        head.load_weights(list(tensors.items()), strict=True)
        quantize_head(head, family, args, model, quantization)
    head.eval()
    return head


def quantizable(module: nn.Module) -> bool:
    """Whether ``nn.quantize`` can turn ``module`` into a quantized layer."""
    return hasattr(module, "to_quantized")


def _quantize_stored(head, family, args, tensors, quantization):
    """Turn the layers stored quantized into quantized layers (mlx-lm's
    ``load_model`` class predicate, applied to the head's stored paths)."""

    def predicate(path, module):
        stored = family.stored_key(path, args)
        if stored in quantization:
            return quantization[stored]
        if not quantizable(module):
            return False
        if f"{path}.scales" not in tensors:
            return False
        params = infer_quant_config(path, module, tensors)
        if f"{path}.global_scale" in tensors:
            params["global_scale"] = True
        return params

    nn.quantize(head, class_predicate=predicate)


def quantize_head(
    head: MTPHead,
    family: Family,
    args,
    model: Optional[nn.Module],
    quantization: Optional[Dict[str, Any]],
    quant_predicate=None,
) -> Dict[str, dict]:
    """Quantize a floating-point head like ``mlx_lm.utils.quantize_model``
    quantizes the target, with the group size, bits and mode (default
    affine) of ``quantization`` (the target's ``config["quantization"]``;
    ``None`` leaves the head as it is): every :func:`quantizable` layer whose
    input size the group divides, filtered by ``quant_predicate`` (default:
    the target's own ``quant_predicate``), which sees the layer's *stored*
    path so path-based rules (e.g. Qwen's 8-bit router gates) apply to the
    MTP block as they do to the target's layers.

    Returns the per-layer parameters the predicate chose (stored path ->
    dict), for ``config["quantization"]``.
    """
    if quantization is None:
        return {}
    group_size = quantization["group_size"]
    if quant_predicate is None and model is not None:
        quant_predicate = getattr(model, "quant_predicate", None)
    chosen = {}

    def predicate(path, module):
        if not quantizable(module):
            return False
        if module.weight.shape[-1] % group_size != 0:
            return False
        decision = True
        if quant_predicate is not None:
            decision = quant_predicate(family.stored_key(path, args), module)
        if isinstance(decision, dict):
            chosen[family.stored_key(path, args)] = decision
        return decision

    nn.quantize(
        head,
        group_size,
        quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )
    return chosen


def stored_tensors(head: MTPHead, family: Family, args) -> Dict[str, mx.array]:
    """The head's parameters under the family's own checkpoint names."""
    return {family.stored_key(k, args): v for k, v in tree_flatten(head.parameters())}
