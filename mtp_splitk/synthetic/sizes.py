# Copyright © 2026 mtp_splitk contributors

"""The real shapes of the synthetic models (published configs), for the GPU.

:data:`SIZES` maps a size name to ``(family, config fields)``; each entry says
where its numbers were read. A reduced-depth size (``-12l``) keeps every width
and the layer pattern of its model and only drops whole blocks of layers, so
each layer costs what it costs in the full model.
"""

import copy

# Qwen/Qwen3-Next-80B-A3B-Instruct, config.json
# (https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct/blob/main/config.json),
# read as quoted field by field in NVIDIA-NeMo/Megatron-Bridge
# tests/unit_tests/models/qwen/test_qwen3_next_bridge.py (fixture
# qwen3_next_80b_a3b_config_dict), and checked against AI-Hypercomputer/maxtext
# src/MaxText/utils/ckpt_scripts/convert_qwen3_next_unscanned.py
# (MODEL_PARAMS_DICT["qwen3-next-80b-a3b"]), which gives the same 48 layers,
# cycle of 4, 16 / 2 heads of 256, hidden 2048, vocabulary 151936, 512 experts
# top-10 of width 512 and Gated DeltaNet 16 key / 32 value heads of 128, conv 4.
_QWEN3_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 5120,  # unused: every layer is MoE (mlp_only_layers [])
    "num_hidden_layers": 48,
    # Every 4th layer full attention, the 3 before it Gated DeltaNet.
    "full_attention_interval": 4,
    # Gated attention: 16 query heads (q_proj doubles them for the gate), 2 KV heads.
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    # Gated DeltaNet
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    # MoE: 512 routed experts, top-10, plus one gated shared expert.
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000000,
    "partial_rotary_factor": 0.25,  # RoPE on 64 of the 256 head dims
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
}

# Qwen/Qwen3.5-122B-A10B (model_type qwen3_5_moe, text fields nested in
# text_config). Its config.json is not among the stored sources; its numbers are
# read from sources quoting it: ml-explore/mlx benchmarks/python/grouped_mlp_bench.py
# (CONFIGS["qwen3.5-122b-a10b"] = hidden 3072, expert width 1024, 256 experts,
# top-8, citing https://huggingface.co/Qwen/Qwen3.5-122B-A10B/blob/main/config.json);
# docs.vultr.com/models/alibaba-qwen-35/qwen3.5-122b-a10b (48 hybrid layers, 32
# attention heads, hidden 3072, 8 routed + 1 shared of 256 experts); the
# olka-fi/Qwen3.5-122B-A10B-MXFP4 model card (vocabulary 248320); notes quoting
# the config in public repositories the index does not name (36 Gated DeltaNet +
# 12 attention layers, 2 KV heads, head_dim 256, shared expert 1024, Gated
# DeltaNet 16 key / 64 value heads of 128, conv 4). RoPE and the norm epsilon are
# the Qwen3.5 family's (Qwen3.5-35B-A3B's config), not read for this model.
_QWEN3_5_122B_TEXT = {
    "model_type": "qwen3_5_moe_text",
    "hidden_size": 3072,
    "num_hidden_layers": 48,
    "full_attention_interval": 4,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 64,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 1024,
    "shared_expert_intermediate_size": 1024,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
    },
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "vocab_size": 248320,
}


def reduced_depth(fields: dict, layers: int) -> dict:
    """``fields`` with ``layers`` decoder layers: whole blocks of the layer
    pattern (``full_attention_interval``) only, every width kept."""
    fields = copy.deepcopy(fields)
    text = fields.get("text_config", fields)
    interval = text.get("full_attention_interval", 1)
    if layers % interval or not 0 < layers <= text["num_hidden_layers"]:
        raise ValueError(
            f"{layers} layers is not a whole number of {interval}-layer blocks "
            f"of at most {text['num_hidden_layers']} layers."
        )
    text["num_hidden_layers"] = layers
    return fields


# Real shapes (published configs), for the GPU. Each names its family.
SIZES = {
    "llama3-8b": (
        "llama",
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "vocab_size": 128256,
        },
    ),
    # The Llama 3 vocabulary, so it drafts for llama3-8b.
    "llama3.2-1b": (
        "llama",
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "vocab_size": 128256,
        },
    ),
    "qwen3-30b-a3b": (
        "qwen3_moe",
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": False,
            "vocab_size": 151936,
        },
    ),
    # The Qwen3 vocabulary, so it drafts for qwen3-30b-a3b.
    "qwen3-0.6b": (
        "qwen3",
        {
            "architectures": ["Qwen3ForCausalLM"],
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": True,
            "vocab_size": 151936,
        },
    ),
    # ~80B parameters: 55 GB at 5 bits (56 GB with the MTP head), more than the
    # GPU machine's disk holds next to anything else.
    "qwen3-next-80b-a3b": ("qwen3_next", _QWEN3_NEXT_80B),
    # 12 layers (3 blocks of 3 Gated DeltaNet + 1 attention layer): 14 GB at 5
    # bits (15 GB with the MTP head), the same work a layer.
    "qwen3-next-80b-a3b-12l": ("qwen3_next", reduced_depth(_QWEN3_NEXT_80B, 12)),
    "qwen3.5-122b-a10b": (
        "qwen3_5_moe",
        {
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "tie_word_embeddings": False,
            "text_config": _QWEN3_5_122B_TEXT,
        },
    ),
}
