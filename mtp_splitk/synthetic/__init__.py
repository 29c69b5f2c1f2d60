# Copyright © 2026 mtp_splitk contributors

"""Synthetic mlx-lm model directories: real file layout, random weights.

A directory written here looks like ``mlx_lm.convert`` output (config.json
with mlx-lm's ``quantization`` entry, safetensors shards named and indexed the
way ``mlx_lm.utils.save_model`` names them, tokenizer files saved by
``transformers``) and loads through ``mlx_lm.load`` and nothing else.

The model's structure always comes from mlx-lm's own ``Model``/``ModelArgs``
classes, built lazily (:mod:`.model`). What differs by size is where the
values come from:

- ``tiny`` and ``small``: the model is evaluated (mlx-lm's own
  initialisation, then ``nn.quantize`` through
  ``mlx_lm.utils.quantize_model``, as convert does).
- real shapes: only the shapes and dtypes are taken from the lazy model; the
  stored tensors are synthesized in packed form (:mod:`.packed`) and
  streamed to disk (:mod:`.safetensors`).

The modules: :mod:`.configs` (families, tiny and small), :mod:`.sizes` (the
published shapes), :mod:`.footprint` (parameters and bytes of a size, from its
shapes alone), :mod:`.tokenizer` (a byte-level BPE built in code; no network
is used), :mod:`.writer` (model directories: :func:`write_model`,
:func:`write_pair`), :mod:`.mtp` (random MTP heads: :func:`write_mtp_model`).
This is tooling: it uses the runtime (``mtp_splitk.mtp``), and nothing of the
runtime uses it.
"""

from .configs import (
    DEFAULT_QUANTIZATION,
    FAMILIES,
    REAL_ONLY,
    SIZES,
    TINY,
    model_config,
    text_config,
)
from .footprint import footprint
from .model import evaluated_tensors, lazy_model
from .mtp import mtp_head, mtp_weights, write_mtp_model
from .packed import packed_tensors
from .safetensors import Tensor, tensor_from_array, write_safetensors
from .tokenizer import CHAT_TEMPLATE, EOS_TOKEN, SPECIAL_TOKENS, TINY_VOCAB, build_tokenizer
from .writer import FORMAT_VERSION, ExtraWeights, write_directory, write_model, write_pair

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_QUANTIZATION",
    "EOS_TOKEN",
    "FAMILIES",
    "FORMAT_VERSION",
    "REAL_ONLY",
    "SIZES",
    "SPECIAL_TOKENS",
    "TINY",
    "TINY_VOCAB",
    "ExtraWeights",
    "Tensor",
    "build_tokenizer",
    "evaluated_tensors",
    "footprint",
    "lazy_model",
    "model_config",
    "mtp_head",
    "mtp_weights",
    "packed_tensors",
    "tensor_from_array",
    "text_config",
    "write_directory",
    "write_mtp_model",
    "write_model",
    "write_pair",
    "write_safetensors",
]
