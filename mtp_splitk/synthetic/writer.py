# Copyright © 2026 mtp_splitk contributors

"""Synthetic model directories: config.json, tokenizer, safetensors shards, index.

:func:`write_model` writes one model of a family and size, :func:`write_pair`
a tiny target and a layer-skip draft for it; both go through
:func:`write_directory`, which names and indexes the shards the way
``mlx_lm.utils.save_model`` does.
"""

import copy
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .configs import DEFAULT_QUANTIZATION, SIZES, model_config, text_config
from .model import evaluated_tensors, lazy_model, quantize
from .packed import packed_tensors
from .safetensors import Tensor, tensor_from_array, write_safetensors
from .tokenizer import EOS_TOKEN, build_tokenizer

# Bump when the bytes written for the same arguments change, here or in .mtp (cached
# models are keyed on it).
FORMAT_VERSION = 1

# A dict of stored tensors, or a function of the final config returning one.
ExtraWeights = Optional[Union[Dict[str, object], Callable[[dict], Dict[str, object]]]]


def _shards(tensors: List[Tensor], max_bytes: int) -> List[List[Tensor]]:
    """Split like mlx_lm.utils.make_shards: in order, a new shard past the limit."""
    shards, size = [], 0
    for t in tensors:
        if not shards or size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_directory(
    path,
    config: dict,
    tensors: List[Tensor],
    total_parameters: int,
    progress: Optional[Callable[[int, int], None]] = None,
    max_shard_bytes: Optional[int] = None,
) -> Path:
    """Write config.json, the tokenizer, safetensors shards and their index."""
    # Lazy: mlx-lm takes a second to import, and the CLI imports this package.
    from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty.")

    text = text_config(config)
    tokenizer = build_tokenizer(text["vocab_size"])
    config = copy.deepcopy(config)
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    save_config(config, path / "config.json")
    tokenizer.save_pretrained(path)

    shards = _shards(tensors, max_shard_bytes or MAX_FILE_SIZE_GB << 30)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    total = sum(t.nbytes for t in tensors)
    done = 0

    def advance(n):
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    weight_map = {}
    for i, shard in enumerate(shards):
        name = fmt.format(i + 1, len(shards))
        write_safetensors(path / name, shard, advance)
        weight_map.update({t.name: name for t in shard})
    index = {
        "metadata": {"total_size": total, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return path


def _prefer_words(model, vocab_size: int) -> None:
    """Halve the LM-head rows of the 256 single-byte tokens.

    A random model picks any id, and two thirds of a 384-token vocabulary are
    single bytes, mostly control characters: the demo would print newlines.
    Real models give such tokens small output norms; so does this one.
    """
    tokens = build_tokenizer(vocab_size).convert_ids_to_tokens(list(range(vocab_size)))
    rows = mx.array([0.5 if len(t) == 1 else 1.0 for t in tokens])[:, None]
    params = dict(tree_flatten(model.parameters()))
    head = [k for k in params if k.endswith("lm_head.weight")]
    head = head or [k for k in params if k.endswith("embed_tokens.weight")]  # tied
    model.load_weights(
        [(k, (params[k] * rows).astype(params[k].dtype)) for k in head], strict=False
    )


def write_model(
    path,
    family: str,
    size: str = "tiny",
    quantization: Optional[dict] = DEFAULT_QUANTIZATION,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    extra_weights: ExtraWeights = None,
    *,
    dtype: str = "bfloat16",
    packed: Optional[bool] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    max_shard_bytes: Optional[int] = None,
) -> Path:
    """Write a synthetic mlx-lm model directory and return its path.

    Args:
        path: an empty or missing directory.
        family: one of ``FAMILIES`` (an mlx-lm model_type).
        size: ``"tiny"``, ``"small"`` or a real shape of that family (``SIZES``).
        quantization: ``{"bits", "group_size", "mode"}`` as for
            ``mlx_lm.convert`` (affine 2-8 bits, mxfp4, mxfp8, nvfp4), or
            None for an unquantized model.
        seed: the same seed writes the same bytes.
        vocab_size: overrides the family's (tiny and small: 384).
        extra_weights: more tensors (mx.array or np.ndarray) stored as given,
            after the model's, under their final names: e.g. MTP heads under
            the family's HF names. Either a dict or a function of the final
            config (the one written to config.json, quantization entries
            included) returning one. mlx_lm.load (strict) accepts them only
            where the family's sanitize drops them from converted checkpoints
            too: qwen3_5 ("mtp.*") and mimo ("model.mtp_layers.*") do;
            qwen3_next drops "mtp.*" only from unconverted ones, deepseek_v3
            only "model.layers.61.*".
        dtype: the checkpoint dtype (``torch_dtype``).
        packed: synthesize packed values instead of evaluating the model;
            default: True for the real shapes, False for tiny and small.
        progress: called as ``progress(bytes_done, bytes_total)`` while writing.
        max_shard_bytes: shard size limit (default mlx-lm's 5 GB).
    """
    config = model_config(family, size, vocab_size, dtype)
    if packed is None:
        packed = size in SIZES
    if not packed:
        mx.random.seed(seed)  # mlx-lm's initialisers draw from the global generator
    model, config = lazy_model(config, quantization)
    tensors = packed_tensors(model, seed) if packed else evaluated_tensors(model)
    return _write_with_extras(
        path, model, config, tensors, extra_weights, progress, max_shard_bytes
    )


def write_pair(
    path,
    family: str = "llama",
    quantization: Optional[dict] = DEFAULT_QUANTIZATION,
    seed: int = 0,
    *,
    target_layers: int = 4,
    draft_layers: int = 1,
    dtype: str = "bfloat16",
) -> Tuple[Path, Path]:
    """Write a tiny target and a draft for it into ``path/target`` and ``path/draft``.

    The draft is the target's first ``draft_layers`` layers with the same
    embeddings, final norm, LM head and tokenizer (a layer-skip draft):
    random weights give no two independent models anything to agree on,
    while this draft agrees with its target on most tokens and still
    disagrees on some, so both the accept and the reject paths run.
    """
    if not 0 < draft_layers < target_layers:
        raise ValueError("need 0 < draft_layers < target_layers.")
    path = Path(path)
    config = model_config(family, "tiny", dtype=dtype)
    text_config(config)["num_hidden_layers"] = target_layers
    mx.random.seed(seed)
    target, _ = lazy_model(config, None)
    _prefer_words(target, text_config(config)["vocab_size"])
    target, target_config = quantize(target, config, quantization)
    tensors = evaluated_tensors(target)
    _write_with_extras(path / "target", target, target_config, tensors)

    text_config(config)["num_hidden_layers"] = draft_layers
    draft, draft_config = lazy_model(config, quantization)
    by_name = {t.name: t for t in tensors}
    shared = []
    for name, value in tree_flatten(draft.parameters()):
        t = by_name[name]  # every draft parameter is one of the target's
        if t.shape != tuple(value.shape):
            raise AssertionError(f"{name}: draft shape {value.shape} != target {t.shape}.")
        shared.append(t)
    _write_with_extras(path / "draft", draft, draft_config, shared)
    return path / "target", path / "draft"


def _write_with_extras(
    path,
    model,
    config,
    tensors,
    extra_weights: ExtraWeights = None,
    progress=None,
    max_shard_bytes=None,
) -> Path:
    # Lazy: mlx-lm takes a second to import, and the CLI imports this package.
    from mlx_lm.utils import get_total_parameters

    if callable(extra_weights):
        extra_weights = extra_weights(copy.deepcopy(config))
    taken = {t.name for t in tensors}
    for name, value in (extra_weights or {}).items():
        if name in taken:
            raise ValueError(f"extra weight {name!r} collides with a model weight.")
        tensors = tensors + [tensor_from_array(name, value)]
    return write_directory(
        path, config, tensors, get_total_parameters(model), progress, max_shard_bytes
    )
