# Copyright © 2026 mtp_splitk contributors

"""A target model as backbone + LM head, for drafters that read its hidden states.

A drafter such as an MTP head reads the target's last hidden state, which
mlx-lm's ``Model.__call__`` does not return. Every supported family splits
the same way, so we call the pieces ourselves instead of changing mlx-lm:
``model.model(inputs, cache)`` (after the final norm) is the hidden state and
``lm_head`` (or ``embed_tokens.as_linear`` when the embeddings are tied) turns
it into logits. Qwen3.5 nests all of this under ``language_model``.
"""

from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn


class TargetParts:
    """Backbone, embedding and LM head of ``model``; see the module docstring.

    ``logits(hidden(x, cache))`` computes exactly what ``model(x, cache)``
    does for the families in :mod:`mtp_splitk.mtp.families` (a test checks
    this per family), so verification through the parts is still the
    target's own forward pass, through the same (patchable) quantized layers.
    """

    def __init__(self, model: nn.Module):
        text = getattr(model, "language_model", model)
        self.backbone = text.model
        if getattr(text, "sharding_group", None) is not None:
            raise ValueError("MTP decoding does not support a sharded LM head.")
        tied = getattr(text.args, "tie_word_embeddings", False)
        self._lm_head = None if tied else getattr(text, "lm_head", None)

    def hidden(self, inputs: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        """(B, L) token ids -> (B, L, D) last hidden states (after the norm)."""
        return self.backbone(inputs, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        if self._lm_head is None:
            return self.backbone.embed_tokens.as_linear(hidden)
        return self._lm_head(hidden)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.backbone.embed_tokens(tokens)
