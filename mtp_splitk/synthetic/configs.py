# Copyright © 2026 mtp_splitk contributors

"""The synthetic models' configs: each family's tiny shape, small and real sizes.

:func:`model_config` gives the HF-style ``config.json`` contents (before
quantization) of a family at a size: ``"tiny"`` (every matmul quantizable at
group size 64, loads in milliseconds), ``"small"`` (tiny with every width x4,
so the GPU kernels plan it) or one of :data:`SIZES`, the published shapes
(:mod:`.sizes`). :data:`FAMILIES` have all three; :data:`REAL_ONLY` families
(``qwen3_5_moe``) only their published shapes.
"""

import copy
from typing import Optional

from .sizes import SIZES
from .tokenizer import SPECIAL_TOKENS, TINY_VOCAB

DEFAULT_QUANTIZATION = {"bits": 4, "group_size": 64, "mode": "affine"}

_DENSE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
}
_LINEAR_ATTENTION = {  # Gated DeltaNet layers of qwen3_next / qwen3_5
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,  # layer 0 linear, layer 1 full attention
}

# Tiny configs: every matmul's input width is a multiple of 64 so that it is
# quantized at group size 64 (quantize_model skips layers that do not divide).
TINY = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,  # the LM head is QuantizedEmbedding.as_linear
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 2.5,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,  # layer 0 dense MLP, layer 1 MoE
        "moe_layer_freq": 1,
        # MLA: embed_q / unembed_out (QuantizedMultiLinear) reduce over
        # qk_nope_head_dim and kv_lora_rank, so both are multiples of 64.
        "kv_lora_rank": 64,
        "q_lora_rank": 64,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "gpt_oss": {
        "architectures": ["GptOssForCausalLM"],
        **_DENSE,
        "intermediate_size": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        # A window longer than the test sequences keeps the rotating cache
        # trimmable, which speculative decoding needs.
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": False,
    },
    "mimo": {
        "architectures": ["MiMoForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 640000.0,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1,
    },
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"],
        **_DENSE,
        **_LINEAR_ATTENTION,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "qwen3_5": {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_5_text",
            **_DENSE,
            **_LINEAR_ATTENTION,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25,
            },
        },
    },
}
FAMILIES = tuple(TINY)

# "small": tiny with every width x4, so each matmul reduces over K >= 128 and
# the GPU kernels (which need K >= 128) plan it. Still loads in a moment.
_WIDTHS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "head_dim",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
)
# Families with published shapes only (no tiny or small size).
REAL_ONLY = tuple(sorted({f for f, _ in SIZES.values()} - set(TINY)))


def text_config(config: dict) -> dict:
    """The dict that holds the language model's fields (nested for qwen3_5)."""
    return config.get("text_config", config)


def model_config(
    family: str,
    size: str = "tiny",
    vocab_size: Optional[int] = None,
    dtype: str = "bfloat16",
) -> dict:
    """The HF-style config.json contents (before quantization) of a synthetic model.

    ``dtype`` is the checkpoint's ``torch_dtype``, which convert casts to.
    """
    if family not in TINY and family not in REAL_ONLY:
        raise ValueError(
            f"Unknown family {family!r}; expected one of {', '.join(FAMILIES + REAL_ONLY)}."
        )
    if size in ("tiny", "small") and family in TINY:
        fields = copy.deepcopy(TINY[family])
        if size == "small":
            text = text_config(fields)
            text.update({k: 4 * v for k, v in text.items() if k in _WIDTHS})
    elif size in SIZES:
        size_family, fields = SIZES[size]
        if size_family != family:
            raise ValueError(f"Size {size!r} is a {size_family} shape, not {family}.")
    else:
        own = [s for s, (f, _) in SIZES.items() if f == family]
        names = ", ".join((["tiny", "small"] if family in TINY else []) + own)
        raise ValueError(f"Unknown size {size!r} for {family}; expected one of {names}.")
    config = {"model_type": family, **copy.deepcopy(fields), "torch_dtype": dtype}
    text = text_config(config)
    text["vocab_size"] = vocab_size or text.get("vocab_size", TINY_VOCAB)
    if text["vocab_size"] < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least 260, got {text['vocab_size']}.")
    return config
