# Copyright © 2026 mtp_splitk contributors

"""Multi-token-prediction (MTP) heads as mlx modules.

An MTP head predicts the token after next. Its input at position ``i`` is
the target's last hidden state ``h_i`` (after the final norm) and the
embedding of token ``t_{i+1}``; the two are normalised, concatenated,
projected back to the hidden size and run through one decoder block of the
target's own family (mlx-lm's class, so quantization, MoE routing and the
split-K patch apply to it unchanged). A final norm gives the hidden state
that the target's LM head turns into logits for ``t_{i+2}``.

The three checkpoint layouts differ in names and in the order of the
concatenation, checked against the public reference implementations:

- DeepSeek-V3 / GLM-4.5 (``model.layers.{num_hidden_layers}.*``):
  ``eh_proj([enorm(emb), hnorm(h)])``, final ``shared_head.norm``; embedding
  first. vLLM ``model_executor/models/deepseek_mtp.py`` and
  ``glm4_moe_mtp.py`` (``DeepSeekMultiTokenPredictorLayer.forward``,
  ``torch.cat([inputs_embeds, previous_hidden_states])``) and SGLang
  ``srt/models/deepseek_nextn.py`` (``DeepseekModelNextN.forward``,
  ``torch.cat((self.enorm(...), self.hnorm(...)))``).
- Qwen3-Next / Qwen3.5 (``mtp.*``): ``fc([pre_fc_norm_embedding(emb),
  pre_fc_norm_hidden(h)])``, blocks ``mtp.layers.N``, final ``mtp.norm``;
  embedding first. vLLM ``qwen3_next_mtp.py`` and ``qwen3_5_mtp.py``
  (``Qwen3NextMultiTokenPredictor.forward``: ``torch.cat([inputs_embeds,
  hidden_states])``).
- MiMo (``model.mtp_layers.N.*``): ``input_proj([hidden_layernorm(h),
  token_layernorm(emb)])``, final ``final_layernorm``; *hidden first*. vLLM
  ``mimo_mtp.py`` (``MiMoMultiTokenPredictorLayer.forward``:
  ``torch.cat([previous_hidden_states, inputs_embeds])``).

Two choices where the references differ:

- vLLM zeroes the embedding at sequence position 0 ("not needed by MTP");
  SGLang does not, and neither does Megatron-LM's MTP training code
  (``megatron/core/transformer/multi_token_prediction.py``: ``roll_tensor``
  shifts the ids left and zero-fills the *last* position). We follow SGLang:
  no masking.
- When the head is iterated on its own output to draft a second token, vLLM's
  DeepSeek head feeds back the block output *before* ``shared_head.norm``,
  while SGLang's DeepSeek head and vLLM's Qwen and MiMo heads feed back the
  *normed* output. We feed back the normed output everywhere: it sits where
  the target's hidden state sits (right before the LM head), which is what
  the head was trained to read.

The embedding table and the LM head are the target's own (DeepSeek-V3
checkpoints store copies under the MTP layer; they are equal to the target's
and are not loaded), so the head takes embeddings in and gives hidden states
out; :class:`mtp_splitk.speculative.target.TargetParts` does the lookups.
"""

from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache


class MTPHead(nn.Module):
    """Common driver: project, one decoder block, final norm.

    Subclasses build the parts under their checkpoint names and say how the
    two inputs are combined.
    """

    # DeepSeek's MLA attention applies its mask with ``mx.where`` and needs an
    # array, not mlx-lm's "causal" shorthand.
    mask_as_array = False

    def project(self, hidden: mx.array, embeds: mx.array) -> mx.array:
        raise NotImplementedError

    @property
    def blocks(self) -> List[nn.Module]:
        raise NotImplementedError

    def final_norm(self, x: mx.array) -> mx.array:
        raise NotImplementedError

    def __call__(
        self,
        hidden: mx.array,
        embeds: mx.array,
        cache: Optional[List[Any]] = None,
    ) -> mx.array:
        """``hidden``: (B, L, D) target (or own) hidden states; ``embeds``:
        (B, L, D) embeddings of the tokens that follow them. Returns the
        normed hidden states (B, L, D) for the LM head."""
        x = self.project(hidden, embeds)
        if cache is None:
            cache = [None] * len(self.blocks)
        mask = create_attention_mask(x, cache[0], return_array=self.mask_as_array)
        for block, c in zip(self.blocks, cache):
            x = block(x, mask, c)
        return self.final_norm(x)

    def make_cache(self) -> List[KVCache]:
        # The MTP blocks are full-attention layers in every supported family,
        # so a plain (trimmable) KV cache each.
        return [KVCache() for _ in self.blocks]


class SharedHead(nn.Module):
    """``shared_head``: only its norm is loaded; ``shared_head.head`` is the
    target's ``lm_head``."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dims, eps=eps)


class DeepSeekMTP(MTPHead):
    """DeepSeek-V3 / GLM-4.5 layout (``model.layers.{num_hidden_layers}``)."""

    def __init__(self, block: nn.Module, dims: int, eps: float, mask_as_array: bool):
        super().__init__()
        self.enorm = nn.RMSNorm(dims, eps=eps)
        self.hnorm = nn.RMSNorm(dims, eps=eps)
        self.eh_proj = nn.Linear(2 * dims, dims, bias=False)
        self.block = block
        self.shared_head = SharedHead(dims, eps)
        self.mask_as_array = mask_as_array

    def project(self, hidden, embeds):
        x = mx.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1)
        return self.eh_proj(x)

    @property
    def blocks(self):
        return [self.block]

    def final_norm(self, x):
        return self.shared_head.norm(x)


class QwenMTP(MTPHead):
    """Qwen3-Next / Qwen3.5 layout (``mtp.*``)."""

    def __init__(self, block: nn.Module, dims: int, eps: float):
        super().__init__()
        self.pre_fc_norm_embedding = nn.RMSNorm(dims, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(dims, eps=eps)
        self.fc = nn.Linear(2 * dims, dims, bias=False)
        self.layers = [block]
        self.norm = nn.RMSNorm(dims, eps=eps)

    def project(self, hidden, embeds):
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)],
            axis=-1,
        )
        return self.fc(x)

    @property
    def blocks(self):
        return self.layers

    def final_norm(self, x):
        return self.norm(x)


class MiMoMTP(MTPHead):
    """MiMo layout (``model.mtp_layers.N``); note the hidden state goes first."""

    def __init__(self, block: nn.Module, dims: int, eps: float):
        super().__init__()
        self.token_layernorm = nn.RMSNorm(dims, eps=eps)
        self.hidden_layernorm = nn.RMSNorm(dims, eps=eps)
        self.input_proj = nn.Linear(2 * dims, dims, bias=False)
        self.block = block
        self.final_layernorm = nn.RMSNorm(dims, eps=eps)

    def project(self, hidden, embeds):
        x = mx.concatenate(
            [self.hidden_layernorm(hidden), self.token_layernorm(embeds)], axis=-1
        )
        return self.input_proj(x)

    @property
    def blocks(self):
        return [self.block]

    def final_norm(self, x):
        return self.final_layernorm(x)
