# Copyright © 2026 mtp_splitk contributors

"""Verify rows computed the way decode rows are.

mlx-lm's DeepSeek-V3 (MLA) attention takes its absorbed path (attention over
the latent, ``embed_q`` on the queries, ``unembed_out`` on the output) for one
row and the expanded path for several. Both are the same function, rounded
differently: in bfloat16 a verify row then differs from the decode row it
checks by an ulp, near-ties flip, and greedy speculation parts from greedy
decoding. :func:`decode_arithmetic` makes calls of up to :data:`ABSORBED_ROWS`
rows (verify passes, MTP heads) take the absorbed path too, from the end of the
prefill to the end of a generation; the prompt keeps mlx-lm's own path.
"""

from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import deepseek_v3
from mlx_lm.models.base import scaled_dot_product_attention

#: Calls of at most this many rows take the absorbed (decode) path.
ABSORBED_ROWS = 64


def _deepseek_v3_attention_call(
    self,
    x: mx.array,
    mask: Optional[mx.array] = None,
    cache: Optional[Any] = None,
) -> mx.array:
    # mlx-lm 0.32.2's DeepseekV3Attention.__call__ with `L == 1` read as
    # `L <= ABSORBED_ROWS` (tests/test_pipelined.py compares the two trees).
    B, L, D = x.shape

    if self.q_lora_rank is None:
        q = self.q_proj(x)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    q = q.reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)
    compressed_kv = self.kv_a_proj_with_mqa(x)
    compressed_kv, k_pe = mx.split(compressed_kv, [self.kv_lora_rank], axis=-1)
    k_pe = k_pe.reshape(B, L, 1, self.qk_rope_head_dim).transpose(0, 2, 1, 3)
    kv_latent = self.kv_a_layernorm(compressed_kv)

    offset = cache.offset if cache is not None else 0
    q_pe = self.rope(q_pe, offset)
    k_pe = self.rope(k_pe, offset)

    kv_latent = mx.expand_dims(kv_latent, axis=1)

    if cache is not None:
        kv_latent, k_pe = cache.update_and_fetch(kv_latent, k_pe)

    pe_scores = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
    if mask is not None:
        pe_scores = mx.where(
            mask,
            pe_scores,
            mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype),
        )

    if L <= ABSORBED_ROWS:
        q_nope = self.embed_q(q_nope)
        k = v = kv_latent
    else:
        k = self.embed_q(kv_latent, transpose=False)
        v = self.unembed_out(kv_latent)

    output = scaled_dot_product_attention(
        q_nope, k, v, cache=cache, scale=self.scale, mask=pe_scores
    )
    if L <= ABSORBED_ROWS:
        output = self.unembed_out(output)

    output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return self.o_proj(output)


class _AbsorbedDeepseekV3Attention(deepseek_v3.DeepseekV3Attention):
    __call__ = _deepseek_v3_attention_call


# The original class -> the same attention with verify rows on the decode path.
_SWAPS = {deepseek_v3.DeepseekV3Attention: _AbsorbedDeepseekV3Attention}


def decode_arithmetic(model: nn.Module, drafter=None) -> Callable[[], None]:
    """From now on, the attention layers of ``model`` (and of the drafter's
    ``model`` or ``head``) whose path depends on the number of rows take their
    one-row path for calls of up to :data:`ABSORBED_ROWS` rows (each
    instance's class is swapped). Returns the function that puts them back.

    The loops call it after the prefill, so that the prompt goes through
    mlx-lm's own path as in plain decoding, and undo it when they close."""
    models = [model] + [getattr(drafter, name, None) for name in ("model", "head")]
    return swap_classes([m for m in models if isinstance(m, nn.Module)], _SWAPS)


def swap_classes(models, swaps: dict) -> Callable[[], None]:
    """Give every module of ``models`` whose class is a key of ``swaps`` that
    key's value as its class; returns the function that puts them back."""
    swapped = []
    for m in models:
        for _, module in m.named_modules():
            new = swaps.get(type(module))
            if new is not None:
                swapped.append((module, type(module)))
                module.__class__ = new

    def undo():
        for module, cls in swapped:
            module.__class__ = cls

    return undo
