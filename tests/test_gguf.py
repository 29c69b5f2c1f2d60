# Copyright © 2026 mtp_splitk contributors
"""GGUF -> mlx-lm conversion on small synthetic files (no network): every supported type,
the q/k permutation and the tokenizer, against truths written in tests/_gguf_ref.py."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models import llama

import _gguf_ref as ref
from mtp_splitk import gguf

# One of each type in layer 0; layer 1 and the rest keep Q4_1 matrices and F32 norms.
MIXED = {
    "token_embd.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q4_1",
    "blk.0.attn_k.weight": "Q4_0",
    "blk.0.attn_v.weight": "F16",
    "blk.0.attn_output.weight": "BF16",
    "blk.0.ffn_up.weight": "Q8_0",
    "blk.0.ffn_down.weight": "F32",
    "output.weight": "Q8_0",
}
PROMPT = [[5, 77, 120, 259, 33, 200, 41, 9]]


def reference_logits(config: dict, hf: dict) -> np.ndarray:
    """mlx-lm's llama built straight from the Hugging Face weights, in float32."""
    args = llama.ModelArgs.from_dict({k: v for k, v in config.items() if "quant" not in k})
    model = llama.Model(args)
    model.load_weights([(gguf.hf_name(k), mx.array(v)) for k, v in hf.items()])
    return np.array(model(mx.array(PROMPT)))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("variant", ["q4", "float"])
def test_converted_model_matches_hf_weights(tmp_path, variant, tied):
    hf = ref.tiny_llama_gguf(tmp_path / "m.gguf", MIXED, tied=tied)
    out = gguf.convert(tmp_path / "m.gguf", tmp_path / "out", variant, dtype=mx.float32)
    model, _ = load(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    np.testing.assert_allclose(
        np.array(model(mx.array(PROMPT))), reference_logits(config, hf), rtol=1e-4, atol=1e-4
    )
    layer = model.model.layers[0]
    if variant == "q4":
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
        assert model.model.embed_tokens.bits == 8 and layer.mlp.up_proj.bits == 8
        assert layer.self_attn.q_proj.bits == layer.self_attn.k_proj.bits == 4
        assert layer.self_attn.q_proj.group_size == 32
        assert type(layer.self_attn.v_proj) is nn.Linear  # F16 in the file: left float
        assert type(layer.mlp.down_proj) is nn.Linear
    else:
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert layer.self_attn.q_proj.weight.dtype == mx.float32


def test_attention_biases(tmp_path):
    hf = ref.tiny_llama_gguf(tmp_path / "m.gguf", MIXED, bias=True)
    out = gguf.convert(tmp_path / "m.gguf", tmp_path / "out", "q4", dtype=mx.float32)
    model, _ = load(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] and not config["mlp_bias"]
    np.testing.assert_allclose(
        np.array(model(mx.array(PROMPT))), reference_logits(config, hf), rtol=1e-4, atol=1e-4
    )


def test_unpermute_is_llama_cpp_inverse_on_packed_rows():
    rows = mx.arange(48 * 5).reshape(48, 5).astype(mx.uint32)  # 3 heads of 16 rows
    permuted = ref.llama_cpp_permute(np.array(rows), 3)
    assert (np.array(gguf.unpermute_rows(mx.array(permuted), 3)) == np.array(rows)).all()


def test_wrong_permutation_changes_logits(tmp_path, monkeypatch):
    """The logits check above has the power to see a missing un-permutation."""
    hf = ref.tiny_llama_gguf(tmp_path / "m.gguf", {})
    monkeypatch.setattr(gguf, "unpermute_rows", lambda a, n_head: a)
    out = gguf.convert(tmp_path / "m.gguf", tmp_path / "out", "float", dtype=mx.float32)
    model, _ = load(str(out))
    config = json.loads((out / "config.json").read_text())
    diff = np.abs(np.array(model(mx.array(PROMPT))) - reference_logits(config, hf)).max()
    assert diff > 1e-2


def test_bf16_read_exactly(tmp_path):
    """mx.load would give BF16 as float16; the converter keeps the stored bits."""
    ref.tiny_llama_gguf(tmp_path / "m.gguf", {"blk.0.attn_output.weight": "BF16"})
    metadata, tensors = gguf.read_gguf(tmp_path / "m.gguf")
    info = tensors["blk.0.attn_output.weight"]
    arrays = gguf.load_tensors(tmp_path / "m.gguf", tensors)
    raw = gguf.raw_tensor_bytes(tmp_path / "m.gguf", info)
    assert arrays[info.name].dtype == mx.bfloat16
    expect = ref.dequantize(raw, "BF16", info.shape)
    assert (np.array(arrays[info.name].astype(mx.float32)) == expect).all()


def test_unsupported_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "m.gguf"
    garbage = bytes(22 * 2 * 64 // 32)  # Q5_0: 22 bytes a block of 32; never decoded
    ref.write_gguf(
        path, {"general.architecture": "llama"}, [("blk.0.attn_q.weight", (2, 64), "Q5_0", garbage)]
    )
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight' has type Q5_0"):
        gguf.convert(path, tmp_path / "out")


def test_other_architecture_refused(tmp_path):
    path = tmp_path / "m.gguf"
    ref.write_gguf(path, {"general.architecture": "qwen2"}, [])
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        gguf.convert(path, tmp_path / "out")


def test_tokenizer_from_metadata(tmp_path):
    ref.tiny_llama_gguf(tmp_path / "m.gguf", {})
    out = gguf.convert(tmp_path / "m.gguf", tmp_path / "out", "q4", dtype=mx.float32)
    _, tok = load(str(out))
    vocab = tok.get_vocab()
    assert tok.encode(" t") == [vocab["Ġt"]]  # the one merge
    assert tok.encode("12") == [vocab["1"], vocab["2"]]
    text = "<|im_start|>user\n naïve ✓ 12<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == text
    assert tok.eos_token_id == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
