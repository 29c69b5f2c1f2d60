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
