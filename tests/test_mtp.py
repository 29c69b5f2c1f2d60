# Copyright © 2026 mtp_splitk contributors

"""MTP heads: key layouts, concatenation order, loading, quantization, convert."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as plain_generate_step

from mtp_splitk import synthetic
from mtp_splitk.compat import get_classes
from mtp_splitk.mtp import MTP_SHARD, convert, generate_step, head_for, load
from mtp_splitk.mtp.families import family_for, model_module, model_text_args
from mtp_splitk.speculative import TargetParts
from mtp_splitk.synthetic import mtp_weights, write_mtp_model

FAMILIES = ["deepseek_v3", "qwen3_next", "qwen3_5", "mimo"]


def config_for(family, quantization=synthetic.DEFAULT_QUANTIZATION):
    _, config = synthetic.lazy_model(synthetic.model_config(family), quantization)
    return config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """family -> a quantized synthetic model directory with MTP weights."""
    paths = {}

    def get(family):
        if family not in paths:
            path = tmp_path_factory.mktemp(family) / "model"
            paths[family] = write_mtp_model(path, family)
        return paths[family]

    return get


# -- layouts --------------------------------------------------------------------------------

# The MTP-specific tensor names of each layout, as the reference
# implementations load them (vLLM deepseek_mtp.py / qwen3_next_mtp.py /
# mimo_mtp.py, SGLang deepseek_nextn.py); the tiny targets have 2 layers.
OWN_KEYS = {
    "deepseek_v3": [
        "model.layers.2.enorm.weight",
        "model.layers.2.hnorm.weight",
        "model.layers.2.eh_proj.weight",
        "model.layers.2.shared_head.norm.weight",
    ],
    "qwen3_next": [
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.fc.weight",
        "mtp.norm.weight",
    ],
    "qwen3_5": [
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.fc.weight",
        "mtp.norm.weight",
    ],
    "mimo": [
        "model.mtp_layers.0.token_layernorm.weight",
        "model.mtp_layers.0.hidden_layernorm.weight",
        "model.mtp_layers.0.input_proj.weight",
        "model.mtp_layers.0.final_layernorm.weight",
    ],
}
# One tensor of the decoder block, directly under the layer (or mtp.layers.0).
BLOCK_KEY = {
    "deepseek_v3": "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
    "qwen3_next": "mtp.layers.0.self_attn.q_proj.weight",
    "qwen3_5": "mtp.layers.0.self_attn.q_proj.weight",
    "mimo": "model.mtp_layers.0.self_attn.q_proj.bias",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_keys_follow_the_reference_layout(family):
    config = config_for(family, None)
    keys = set(mtp_weights(config))
    assert set(OWN_KEYS[family]) <= keys
    assert BLOCK_KEY[family] in keys
    # The target's embedding and LM head are shared, never stored again.
    assert not any("embed_tokens" in k or "shared_head.head" in k for k in keys)
    # Every key is one mlx-lm's sanitize treats as MTP (so the target loads).
    module = model_module(config)
    fam = family_for(module)
    model_class, args_class = get_classes(config)
    args = model_text_args(model_class(args_class.from_dict(config)))
    assert all(fam.is_mtp_key(k, args) for k in keys)


def float_head(family):
    config = config_for(family, None)
    module = model_module(config)
    model_class, args_class = get_classes(config)
    args = model_text_args(model_class(args_class.from_dict(config)))
    head = family_for(module).build(module, args)
    head.set_dtype(mx.float32)
    return head, args.hidden_size


# (embedding-side norm, hidden-side norm, projection, embedding first?)
PROJECTIONS = {
    "deepseek_v3": ("enorm", "hnorm", "eh_proj", True),
    "qwen3_next": ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", True),
    "qwen3_5": ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", True),
    "mimo": ("token_layernorm", "hidden_layernorm", "input_proj", False),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_concatenation_order(family):
    """Which norm reads which input, and which half of the projection each
    lands in: embedding first for DeepSeek/GLM and Qwen, hidden first for
    MiMo (the references' torch.cat order)."""
    head, dims = float_head(family)
    enorm, hnorm, proj, embedding_first = PROJECTIONS[family]
    h1, h2, e1, e2 = (
        mx.random.normal((1, 3, dims), key=mx.random.key(i)) for i in range(4)
    )

    def project():
        return head.project(h1, e1), head.project(h2, e1), head.project(h1, e2)

    base, other_h, other_e = project()
    assert not mx.allclose(base, other_h) and not mx.allclose(base, other_e)

    # Silence the embedding's norm: the result no longer depends on it.
    getattr(head, enorm).weight = mx.zeros((dims,))
    base, other_h, other_e = project()
    assert mx.allclose(base, other_e) and not mx.allclose(base, other_h)

    # Zero the projection's first half instead: it reads the embedding in
    # embedding-first layouts, the hidden state in MiMo's.
    getattr(head, enorm).weight = mx.ones((dims,))
    weight = getattr(head, proj).weight
    getattr(head, proj).weight = mx.concatenate(
        [mx.zeros_like(weight[:, :dims]), weight[:, dims:]], axis=1
    )
    base, other_h, other_e = project()
    if embedding_first:
        assert mx.allclose(base, other_e) and not mx.allclose(base, other_h)
    else:
        assert mx.allclose(base, other_h) and not mx.allclose(base, other_e)


@pytest.mark.parametrize("family", FAMILIES)
def test_target_parts_compute_the_models_logits(family, model_dir):
    model, _, _ = load(model_dir(family))
    parts = TargetParts(model)
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert mx.array_equal(parts.logits(parts.hidden(x)), model(x))
    assert parts.embed(x).shape == (1, 8, model_text_args(model).hidden_size)


# -- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_next"])
def test_head_is_quantized_like_the_target(family, model_dir):
    model, head, _ = load(model_dir(family))
    quantized = {p: m for p, m in head.named_modules() if hasattr(m, "bits")}
    assert quantized, "the head of a quantized target must be quantized"
    projection = "eh_proj" if family == "deepseek_v3" else "fc"
    assert (quantized[projection].bits, quantized[projection].group_size) == (4, 64)
    if family == "qwen3_next":
        # The family's quant_predicate keeps router gates at 8 bits, in the
        # MTP block as in the target's layers.
        assert quantized["layers.0.mlp.gate"].bits == 8
        assert model.model.layers[1].mlp.gate.bits == 8
    # Drafting runs through the quantized head.
    parts = TargetParts(model)
    h = parts.hidden(mx.array([[1, 2, 3]]))
    out = head(h, parts.embed(mx.array([[2, 3, 4]])))
    assert out.shape == h.shape and mx.isfinite(out).all()


def test_float_head_is_quantized_at_load_for_a_quantized_target(tmp_path):
    path = write_mtp_model(tmp_path / "m", "qwen3_next", quantize_mtp=False)
    with open(path / "model.safetensors.index.json") as f:
        stored = json.load(f)["weight_map"]
    assert "mtp.fc.weight" in stored and "mtp.fc.scales" not in stored
    _, head, _ = load(path)
    assert head.fc.bits == 4 and head.layers[0].mlp.gate.bits == 8


def test_target_loads_without_its_mtp_tensors(model_dir):
    # The tiny DeepSeek-V3 keeps its MTP layer at index 2, which mlx-lm's
    # sanitize (hard-wired to index 61) would not drop.
    model, head, tokenizer = load(model_dir("deepseek_v3"))
    assert len(model.layers) == 2
    assert not any(
        k.startswith("model.layers.2.") for k, _ in tree_flatten(model.parameters())
    )
    assert tokenizer.eos_token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_mtp_weights_name_the_keys_looked_for(family, tmp_path):
    path = synthetic.write_model(tmp_path / "m", family)
    prefix = {"deepseek_v3": "model.layers.2.", "mimo": "model.mtp_layers.0."}.get(
        family, "mtp."
    )
    with pytest.raises(
        ValueError, match=f"No multi-token-prediction weights.*'{prefix}'"
    ):
        load(path)


def test_unsupported_family_is_a_clear_error(tmp_path):
    path = synthetic.write_model(tmp_path / "m", "qwen3_moe")
    with pytest.raises(
        ValueError, match="No multi-token-prediction layout.*qwen3_moe.*supported"
    ):
        load(path)


def test_generate_step_for_a_target_loaded_by_mlx_lm(model_dir):
    """The drop-in for mlx-lm's speculative step: the target comes from
    stock mlx_lm.load, the head from the same directory."""
    path = model_dir("qwen3_5")
    model, _ = mlx_lm.load(str(path))
    prompt = mx.array([5, 17, 99, 3, 250, 8], mx.uint32)
    plain = [t for t, _ in plain_generate_step(prompt, model, max_tokens=12)]
    out = list(generate_step(prompt, model, model_path=path, max_tokens=12))
    assert [t for t, _, _ in out] == plain
    assert head_for(model, path) is head_for(model, str(path))
    with pytest.raises(ValueError, match="head or the model path"):
        generate_step(prompt, model)


# -- raw Hugging Face tensors -----------------------------------------------------------------


def test_raw_qwen3_next_tensors_are_stacked_and_norms_shifted():
    config = config_for("qwen3_next", None)
    module = model_module(config)
    family = family_for(module)
    model_class, args_class = get_classes(config)
    args = model_text_args(model_class(args_class.from_dict(config)))
    converted = {
        k[len("mtp.") :]: v for k, v in mtp_weights(config, dtype=mx.float32).items()
    }
    # Undo mlx-lm's conversion: per-expert tensors, zero-centred norms.
    raw = {}
    for k, v in converted.items():
        if ".switch_mlp." in k:
            for e in range(args.num_experts):
                raw[k.replace("switch_mlp", f"experts.{e}")] = v[e]
        elif "norm" in k:  # every RMSNorm of the MTP module
            raw[k] = v - 1.0
        else:
            raw[k] = v
    back = family.sanitize(module, args, raw, raw=True)
    assert set(back) == set(converted)
    for k in converted:
        assert mx.array_equal(back[k], converted[k]), k
    # Converted tensors pass through unchanged.
    same = family.sanitize(module, args, converted, raw=False)
    assert all(mx.array_equal(same[k], converted[k]) for k in converted)


def test_raw_deepseek_tensors_go_through_the_familys_sanitize():
    """kv_b_proj splitting and expert stacking come from mlx-lm's own
    deepseek_v3 sanitize, applied to the MTP block."""
    config = config_for("deepseek_v3", None)
    module = model_module(config)
    family = family_for(module)
    model_class, args_class = get_classes(config)
    args = model_text_args(model_class(args_class.from_dict(config)))
    raw = {}
    for k, v in mtp_weights(config, dtype=mx.float32).items():
        rest = k[len("model.layers.2.") :]
        if ".switch_mlp." in rest:
            for e in range(args.n_routed_experts):
                raw[rest.replace("switch_mlp", f"experts.{e}")] = v[e]
        elif "embed_q" in rest or "unembed_out" in rest:
            continue
        else:
            raw[rest] = v
    heads = args.num_attention_heads
    kv_b = mx.random.normal(
        (heads * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank)
    )
    raw["self_attn.kv_b_proj.weight"] = kv_b
    raw["embed_tokens.weight"] = mx.zeros((4, 4))  # shared: must be skipped
    tensors = family.sanitize(module, args, raw, raw=True)
    head = family.build(module, args)
    head.load_weights(list(tensors.items()), strict=True)
    wk = kv_b.reshape(heads, -1, args.kv_lora_rank)[:, : args.qk_nope_head_dim]
    assert mx.array_equal(head.block.self_attn.embed_q.weight, wk.swapaxes(-1, -2))


# -- convert --------------------------------------------------------------------------------


def test_convert_keeps_a_quantized_mtp_head(tmp_path):
    # An unquantized source whose MTP tensors sit in its shards, as on the Hub.
    source = write_mtp_model(
        tmp_path / "hf", "mimo", quantization=None, quantize_mtp=False
    )
    source_model, source_head, _ = load(source)
    out = convert(
        str(source), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=64
    )

    with open(out / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    mtp_keys = {k for k, f in weight_map.items() if f == MTP_SHARD}
    assert "model.mtp_layers.0.input_proj.scales" in mtp_keys
    assert set(mx.load(str(out / MTP_SHARD))) == mtp_keys

    mlx_lm.load(str(out))  # stock mlx-lm still loads the target
    model, head, _ = load(out)
    assert head.input_proj.bits == 4 and head.block.self_attn.q_proj.bits == 4
    # The quantized head is the source head, up to 4-bit rounding.
    w = mx.dequantize(
        head.input_proj.weight, head.input_proj.scales, head.input_proj.biases, 64, 4
    )
    ref = source_head.input_proj.weight
    assert mx.abs(w - ref).max() < 0.25 * mx.abs(ref).max()
    assert w.dtype == ref.dtype == mx.bfloat16


def test_convert_fails_fast_without_mtp_weights(tmp_path):
    source = synthetic.write_model(tmp_path / "hf", "mimo", quantization=None)
    with pytest.raises(ValueError, match="'model.mtp_layers.0.'"):
        convert(str(source), str(tmp_path / "mlx"))
    assert not (tmp_path / "mlx").exists()
