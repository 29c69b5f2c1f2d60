"""Synthetic model directories: the layout mlx_lm.convert writes, loaded by mlx_lm.load."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import mla, switch_layers
from mlx_lm.utils import get_total_parameters

from mtp_splitk.compat import get_classes

from mtp_splitk import synthetic

REPO = Path(__file__).resolve().parents[1]
QUANTIZED = (
    nn.QuantizedLinear,
    nn.QuantizedEmbedding,
    switch_layers.QuantizedSwitchLinear,
    mla.QuantizedMultiLinear,
)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: synthetic.write_model(root / f, f) for f in synthetic.FAMILIES}


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_tiny_model_is_a_converted_checkpoint(tiny_dirs, family):
    path = tiny_dirs[family]
    files = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family
    expected = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert {k: config["quantization"][k] for k in expected} == expected
    assert config["quantization_config"] == config["quantization"]

    index = json.loads((path / "model.safetensors.index.json").read_text())
    stored = mx.load(str(path / "model.safetensors"))
    assert set(index["weight_map"]) == set(stored)
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_tiny_model_loads_and_runs(tiny_dirs, family):
    model, tokenizer = mlx_lm.load(str(tiny_dirs[family]))
    layers = [m for _, m in model.named_modules()]
    assert any(isinstance(m, nn.QuantizedLinear) for m in layers)
    # Every matmul layer was quantized (the tiny widths divide the group size).
    assert not [type(m).__name__ for m in layers if type(m) in (nn.Linear, nn.Embedding)]

    prompt = tokenizer.encode("Hello, world! The quick brown fox.")
    logits = model(mx.array([prompt]))
    assert logits.shape == (1, len(prompt), 384)
    assert logits.dtype == mx.bfloat16
    assert mx.isfinite(logits).all().item()
    assert logits.astype(mx.float32).std().item() > 0.1  # not collapsed to a constant


def test_tokenizer(tiny_dirs):
    _, tokenizer = mlx_lm.load(str(tiny_dirs["llama"]))
    text = "Speculative decoding drafts tokens. Ünïcödé and 数字 also encode."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(tokenizer.get_vocab()) == 384
    assert tokenizer.eos_token_ids == {383}
    assert tokenizer.convert_ids_to_tokens(383) == "<|im_end|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Every id decodes (the random models sample all of them).
    assert all(isinstance(tokenizer.decode([i]), str) for i in range(384))


def test_tokenizer_fills_a_real_vocabulary():
    tok = synthetic.build_tokenizer(128256)
    assert len(tok) == 128256
    assert tok.convert_ids_to_tokens(128255) == "<|im_end|>"
    assert tok.decode([100000, 100001]).strip()  # filler tokens decode to words
    assert (
        synthetic.build_tokenizer(128256).backend_tokenizer.to_str()
        == tok.backend_tokenizer.to_str()
    )


def test_same_seed_same_bytes(tmp_path):
    # One writer in another process, with another string-hash salt.
    script = (
        "import sys; from mtp_splitk import synthetic; from pathlib import Path; "
        "[synthetic.write_model(Path(sys.argv[1]) / f'b{p}', 'qwen3_moe', packed=p) "
        "for p in (False, True)]"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=True)
    for packed in (False, True):
        a = synthetic.write_model(tmp_path / f"a{packed}", "qwen3_moe", packed=packed)
        b = tmp_path / f"b{packed}"
        c = synthetic.write_model(
            tmp_path / f"c{packed}", "qwen3_moe", seed=1, packed=packed
        )
        data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
        assert data[0] == data[1]
        assert data[0] != data[2]
        assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


MODES = [
    {"bits": 4, "group_size": 64, "mode": "affine"},
    {"bits": 8, "group_size": 32, "mode": "affine"},
    {"bits": 3, "group_size": 128, "mode": "affine"},
    {"mode": "mxfp4"},
    {"mode": "mxfp8"},
    {"mode": "nvfp4"},
]


@pytest.mark.parametrize(
    "quantization", MODES, ids=lambda q: f"{q['mode']}{q.get('bits', '')}"
)
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_packed_values_have_initialisation_spread(tmp_path, family, quantization):
    """The packed path writes codes and scales directly; dequantized, each
    layer must look like mlx-lm's init (uniform in +-1/sqrt(K)) so that the
    real-shape models the GPU runs keep finite, non-degenerate activations."""
    path = synthetic.write_model(tmp_path / "m", family, "small", quantization, packed=True)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["mode"] == quantization["mode"]
    model, _ = mlx_lm.load(str(path))
    checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, QUANTIZED):
            continue
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
        K = w.shape[-1]
        std = w.astype(mx.float32).std().item()
        target = 1 / math.sqrt(3 * K)
        # E8M0 scales are powers of two (and fp8 codes heavy-tailed): within 2x.
        assert target / 2.5 < std < target * 2.5, (name, m.mode, std, target)
        assert abs(w.astype(mx.float32).mean().item()) < 0.2 * target, name
        checked += 1
    assert checked > 10
    logits = model(mx.array([list(range(1, 40))]))
    assert mx.isfinite(logits).all().item()


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_packed_tiny_loads(tmp_path, family):
    path = synthetic.write_model(tmp_path / "m", family, packed=True)
    model, _ = mlx_lm.load(str(path))
    logits = model(mx.array([[1, 2, 3, 4, 5]]))
    assert mx.isfinite(logits).all().item()


# Published parameter counts (HF model cards / safetensors metadata).
REAL = {
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-0.6b": 596_049_920,
}


@pytest.mark.parametrize("size", REAL)
def test_real_shapes_match_published_parameter_counts(size):
    family, _ = synthetic.SIZES[size]
    config = synthetic.model_config(family, size)
    model, _ = synthetic.lazy_model(config)  # lazy: nothing of 30B is computed
    assert get_total_parameters(model) == REAL[size]


def test_real_shape_directory(tmp_path):
    """llama3.2-1b, written in packed form and sharded, loads through mlx_lm.load
    (strict: every key, shape and dtype as mlx-lm's model expects)."""
    path = synthetic.write_model(
        tmp_path / "m", "llama", "llama3.2-1b", max_shard_bytes=300 << 20
    )
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_parameters"] == REAL["llama3.2-1b"]
    model, tokenizer = mlx_lm.load(str(path))
    assert len(tokenizer.get_vocab()) == 128256
    emb = model.model.embed_tokens
    assert isinstance(emb, nn.QuantizedEmbedding) and emb.weight.shape == (128256, 256)
    q = model.model.layers[7].mlp.down_proj
    w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
    assert w.shape == (2048, 8192)
    assert abs(w.astype(mx.float32).std().item() * math.sqrt(3 * 8192) - 1) < 0.25


def test_unquantized_and_bad_quantization(tmp_path):
    path = synthetic.write_model(tmp_path / "f", "qwen3", quantization=None)
    config = json.loads((path / "config.json").read_text())
    assert "quantization" not in config
    model, _ = mlx_lm.load(str(path))
    assert isinstance(model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="bits=7"):
        synthetic.write_model(
            tmp_path / "b", "qwen3", quantization={"bits": 7, "group_size": 64}
        )
    with pytest.raises(ValueError, match="Unknown family"):
        synthetic.model_config("gpt2")
    with pytest.raises(ValueError, match="llama shape"):
        synthetic.model_config("qwen3", "llama3-8b")


def test_extra_weights(tmp_path):
    """MTP weights under the family's HF names: stored, indexed, dropped by
    mlx-lm's sanitize (so mlx_lm.load still loads strictly). qwen3_5 drops
    "mtp." keys from any checkpoint; qwen3_next only from unconverted ones."""
    fc = mx.random.normal((64, 128)).astype(mx.bfloat16)
    seen = {}

    def extra(config):
        seen.update(config)
        return {"mtp.fc.weight": fc, "mtp.norm.weight": np.ones(64, np.float32)}

    path = synthetic.write_model(tmp_path / "m", "qwen3_5", extra_weights=extra)
    assert seen["quantization"]["bits"] == 4  # the function saw the final config
    stored = mx.load(str(path / "model.safetensors"))
    assert mx.array_equal(stored["mtp.fc.weight"], fc)
    assert stored["mtp.norm.weight"].dtype == mx.float32
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["mtp.fc.weight"] == "model.safetensors"
    mlx_lm.load(str(path))

    with pytest.raises(ValueError, match="collides"):
        synthetic.write_model(
            tmp_path / "x", "qwen3", extra_weights={"model.norm.weight": mx.ones(64)}
        )


def test_pair_shares_weights_and_tokenizer(tmp_path):
    target_path, draft_path = synthetic.write_pair(tmp_path / "pair")
    target = mx.load(str(target_path / "model.safetensors"))
    draft = mx.load(str(draft_path / "model.safetensors"))
    assert "model.layers.3.mlp.up_proj.weight" in target
    assert "model.layers.1.mlp.up_proj.weight" not in draft
    assert set(draft) < set(target)
    assert all(mx.array_equal(v, target[k]) for k, v in draft.items())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (target_path / name).read_bytes() == (draft_path / name).read_bytes()
    model, _ = mlx_lm.load(str(target_path))
    assert len(model.layers) == 4
    # Single-byte tokens get half-norm head rows, so the demo prints words.
    tok = synthetic.build_tokenizer(384)
    head = model.model.embed_tokens
    rows = mx.dequantize(head.weight, head.scales, head.biases, head.group_size, head.bits)
    norms = np.linalg.norm(np.array(rows.astype(mx.float32)), axis=1)
    single = np.array([len(t) == 1 for t in tok.convert_ids_to_tokens(list(range(384)))])
    assert norms[single].mean() < 0.7 * norms[~single].mean()


def test_lazy_model_matches_config_classes():
    config = synthetic.model_config("deepseek_v3", "small")
    model_class, _ = get_classes(config)
    model, qconfig = synthetic.lazy_model(config, synthetic.DEFAULT_QUANTIZATION)
    assert type(model) is model_class
    assert qconfig["quantization"]["bits"] == 4
    embed_q = model.model.layers[0].self_attn.embed_q
    assert isinstance(embed_q, mla.QuantizedMultiLinear)
    assert all(
        v.dtype in (mx.uint32, mx.bfloat16, mx.float32)
        for _, v in tree_flatten(model.parameters())
    )


# Qwen3-Next-80B-A3B and Qwen3.5-122B-A10B: published totals (model cards: "80B",
# "122B"; the checkpoint of the 80B with its MTP layer holds 81.3B, as a
# third-party table quotes it) and active parameters ("A3B", "A10B": rounded).
Q5 = {"bits": 5, "group_size": 64, "mode": "affine"}


def _qwen3_next_parameters(c):
    """Qwen3-Next's parameter count from its config's numbers alone (the HF
    modeling code's layer shapes, independent of mlx-lm's classes)."""
    H, L, interval = c["hidden_size"], c["num_hidden_layers"], c["full_attention_interval"]
    key, value = c["linear_num_key_heads"] * c["linear_key_head_dim"], (
        c["linear_num_value_heads"] * c["linear_value_head_dim"]
    )
    gdn = (
        H * (2 * key + 2 * value)  # in_proj_qkvz
        + H * 2 * c["linear_num_value_heads"]  # in_proj_ba
        + (2 * key + value) * c["linear_conv_kernel_dim"]  # depthwise conv1d
        + 2 * c["linear_num_value_heads"]  # dt_bias, A_log
        + c["linear_value_head_dim"]  # gated norm
        + value * H  # out_proj
    )
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    attention = H * 2 * q + 2 * H * kv + q * H + 2 * c["head_dim"]  # q (with gate), k, v, o, norms
    E, I, S = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    moe = E * 3 * H * I + 3 * H * S + H * E + H  # experts, shared expert, router, shared gate
    layer_norms = 2 * H
    linear = sum((i + 1) % interval != 0 for i in range(L))
    layers = linear * gdn + (L - linear) * attention + L * (moe + layer_norms)
    return layers + 2 * c["vocab_size"] * H + H, E * 3 * H * I  # + embedding, head, norm


def test_qwen3_next_80b_shape_is_the_published_model():
    config = synthetic.model_config("qwen3_next", "qwen3-next-80b-a3b")
    counts = synthetic.footprint("qwen3_next", "qwen3-next-80b-a3b")
    expected, experts_per_layer = _qwen3_next_parameters(config)
    assert counts["parameters"] == expected  # mlx-lm built the config's shapes
    assert abs(counts["parameters"] / 80e9 - 1) < 0.01
    with_head = synthetic.footprint("qwen3_next", "qwen3-next-80b-a3b", mtp=True)
    assert abs(with_head["parameters"] / 81.3e9 - 1) < 0.005
    # One token: 10 of 512 experts; 3.25B without the embedding and LM head.
    active = counts["active_parameters"] - counts["embedding_parameters"]
    assert active == expected - 48 * experts_per_layer * (512 - 10) // 512 - 2 * 151936 * 2048
    assert abs(active / 3e9 - 1) < 0.1

    model, _ = synthetic.lazy_model(config, Q5)  # lazy: nothing of 80B is computed
    pattern = ["attention" if not layer.is_linear else "gdn" for layer in model.layers]
    assert pattern == (["gdn"] * 3 + ["attention"]) * 12
    mlp = model.layers[0].mlp
    assert mlp.switch_mlp.gate_proj.weight.shape == (512, 512, 2048 * 5 // 32)
    assert (mlp.switch_mlp.down_proj.bits, mlp.gate.bits, mlp.shared_expert_gate.bits) == (5, 8, 8)
    assert model.layers[3].self_attn.rope.dims == 64  # partial rotary 0.25 of 256


def test_qwen3_next_12_layers_are_the_full_models_layers():
    """The reduced depth drops whole 4-layer blocks and keeps every shape."""
    full, _ = synthetic.lazy_model(synthetic.model_config("qwen3_next", "qwen3-next-80b-a3b"))
    cut, _ = synthetic.lazy_model(synthetic.model_config("qwen3_next", "qwen3-next-80b-a3b-12l"))
    assert len(cut.layers) == 12
    shapes = lambda m: [(k, v.shape) for k, v in tree_flatten(m.parameters())]  # noqa: E731
    for i in range(12):
        assert shapes(cut.layers[i]) == shapes(full.layers[i]), i
    sizes = ("qwen3-next-80b-a3b", "qwen3-next-80b-a3b-12l")
    full, cut = (synthetic.footprint("qwen3_next", s, Q5) for s in sizes)
    fixed = full["embedding_parameters"] + 2048  # embedding, LM head, final norm
    assert 4 * (cut["parameters"] - fixed) == full["parameters"] - fixed
    # On disk at 5 bits with the head: ~56 GB full depth, ~15 GB cut.
    full, cut = (synthetic.footprint("qwen3_next", s, Q5, mtp=True)["bytes"] for s in sizes)
    assert 55e9 < full < 57e9 and 14.5e9 < cut < 16e9
    with pytest.raises(ValueError, match="whole number of 4-layer blocks"):
        synthetic.sizes.reduced_depth(synthetic.SIZES["qwen3-next-80b-a3b"][1], 10)


def test_qwen3_5_122b_shape():
    counts = synthetic.footprint("qwen3_5_moe", "qwen3.5-122b-a10b")
    assert abs(counts["parameters"] / 122e9 - 1) < 0.01
    assert abs(counts["active_parameters"] / 10e9 - 1) < 0.05
    model, config = synthetic.lazy_model(
        synthetic.model_config("qwen3_5_moe", "qwen3.5-122b-a10b"), Q5
    )
    assert type(model).__module__ == "mlx_lm.models.qwen3_5_moe"
    layers = model.language_model.layers
    assert [layer.is_linear for layer in layers] == [True, True, True, False] * 12
    assert layers[0].mlp.switch_mlp.up_proj.weight.shape == (256, 1024, 3072 * 5 // 32)
    assert "qwen3_5_moe" in synthetic.REAL_ONLY and "qwen3_5_moe" not in synthetic.FAMILIES
    with pytest.raises(ValueError, match="expected one of qwen3.5-122b-a10b"):
        synthetic.model_config("qwen3_5_moe", "tiny")


def test_qwen3_next_layer_pattern_runs_with_its_mtp_head(tmp_path, monkeypatch):
    """The 80B's layer pattern and counts (3 Gated DeltaNet + 1 attention
    layer, 512 experts top-10, 16/2 attention heads, 16/32 linear heads) at
    tiny widths, 5-bit g64, its MTP head in the family's ``mtp.*`` keys:
    loads through mtp.load (mlx-lm's classes), and the head steered to
    p = 0.8 drafts tokens the target accepts, emitting plain greedy decoding,
    in the overlapped loop and in the synchronous one."""
    from mlx_lm.generate import generate_step

    from mtp_splitk import mtp
    from mtp_splitk.bench.drafters import SteeredMTPDrafter
    from mtp_splitk.speculative import Stats, speculative_generate_step

    widths = {"hidden_size": 64, "head_dim": 16, "linear_key_head_dim": 16,
              "linear_value_head_dim": 16, "moe_intermediate_size": 64,
              "shared_expert_intermediate_size": 64, "intermediate_size": 128}
    fields = synthetic.sizes.reduced_depth(synthetic.SIZES["qwen3-next-80b-a3b"][1], 4)
    monkeypatch.setitem(synthetic.SIZES, "pattern-tiny", ("qwen3_next", {**fields, **widths}))
    path = synthetic.write_mtp_model(tmp_path / "m", "qwen3_next", "pattern-tiny", Q5,
                                     vocab_size=384, packed=False)
    stored = mx.load(str(path / "model.safetensors"))
    assert "mtp.layers.0.mlp.switch_mlp.gate_proj.scales" in stored and "mtp.fc.weight" in stored
    model, head, _ = mtp.load(str(path))
    assert [layer.is_linear for layer in model.layers] == [True, True, True, False]
    assert model.layers[0].mlp.switch_mlp.gate_proj.bits == 5
    experts = head.layers[0].mlp.switch_mlp.gate_proj
    assert experts.weight.shape[0] == 512 and experts.bits == 5

    prompt = mx.array(list(range(5, 25)))
    expected = [t for t, _ in generate_step(prompt, model, max_tokens=24)]
    for overlap in (True, False):
        stats = Stats()
        drafter = SteeredMTPDrafter(model, head, expected, 0.8)
        steps = speculative_generate_step(prompt, model, drafter, num_draft_tokens=3,
                                          max_tokens=24, stats=stats, overlap=overlap)
        assert [t for t, _, _ in steps] == expected
        assert stats.accepted > 0 and stats.overlapped == overlap and not stats.overlap_off


# Layering: tooling (synthetic) -> runtime, never back.
RUNTIME_PACKAGES = ("mtp_splitk.mtp", "mtp_splitk.speculative", "mtp_splitk.launch")
RUNTIME_MODULES = ("mtp_splitk.ops", "mtp_splitk.plan", "mtp_splitk.patch", "mtp_splitk.tp")
LOADED = "print(sorted(m for m in sys.modules if m.startswith({!r})))"


def _fresh(script: str) -> str:
    # Another process: this one has imported synthetic already.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
    )
    return run.stdout.strip().splitlines()[-1]


def test_no_runtime_module_loads_synthetic():
    script = (
        "import importlib, pkgutil, sys\n"
        f"names = list({RUNTIME_MODULES!r})\n"
        f"for package in {RUNTIME_PACKAGES!r}:\n"
        "    path = importlib.import_module(package).__path__\n"
        "    names += [package] + [m.name for m in pkgutil.walk_packages(path, package + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names), end=' ')\n" + LOADED.format(("mtp_splitk.synthetic",))
    )
    count, loaded = _fresh(script).split(" ", 1)
    assert int(count) > len(RUNTIME_MODULES) + len(RUNTIME_PACKAGES)
    assert loaded == "[]"


def test_importing_synthetic_loads_no_mlx_lm():
    # The CLI imports synthetic to build its parser; mlx-lm takes a second to import.
    script = "import sys, mtp_splitk.synthetic\n" + LOADED.format(
        ("mlx_lm", "transformers", "mtp_splitk.mtp")
    )
    assert _fresh(script) == "[]"
