"""The fused projection kernels on the GPU (run on the device machine).

Each fused output against the unfused split-K kernel for its weight, bit for
bit (outputs NaN-poisoned first, fresh random inputs, M = 1, 3, 5, 8, 13, odd
N); the gate/up kernel against the unfused kernels followed by mlx-lm's
swiglu, bit for bit; both against mx.quantized_matmul within bf16 tolerance;
the residual add in the dense kernel's epilogue against the dense kernel then
MLX's add, bit for bit; and patched models with the fused path forced, against the unpatched model
(bf16 tolerance) and the patch without fusion (bit for bit).
"""

import math

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import make_prompt_cache

from mtp_splitk import fused, launch, patch, synthetic
from mtp_splitk import plan as planner
from mtp_splitk.plan import FusedPlan, Plan

pytestmark = pytest.mark.gpu

MS = (1, 3, 5, 8, 13)  # token tiles 1 and 2
# (mode, bits, group size, dtype, split, row tiles, depth): the 4-bit fast
# path in both activation types, codes straddling words, an fp mode (no
# biases), and the plan constants that move work between warps without
# changing the math. (Each variant is a JIT compile: the list is short.)
CONFIGS = [
    ("affine", 4, 64, mx.bfloat16, 2, 1, 1),
    ("affine", 4, 64, mx.float16, 4, 2, 2),
    ("nvfp4", 4, 16, mx.bfloat16, 8, 1, 1),
]
IDS = [f"{c[0]}{c[1]}-g{c[2]}-{'bf16' if c[3] == mx.bfloat16 else 'f16'}-wk{c[4]}" for c in CONFIGS]
K = 1088  # 8.5 chunks of 128: a partial last chunk


GLU_CONFIGS = [c for c in CONFIGS if 2 * c[4] <= 8]  # a gate/up block holds 2 x its split
GLU_IDS = [i for i, c in zip(IDS, CONFIGS) if c in GLU_CONFIGS]


def quantized(N, mode, bits, group_size, dtype, seed, K=K):
    mx.random.seed(seed)
    parts = mx.quantize((mx.random.normal((N, K)) * 0.05).astype(dtype), group_size, bits, mode=mode)
    return parts[0], parts[1], (parts[2] if mode == "affine" else None)


def fused_plan(M, Ns, mode, bits, group_size, warps, row_tiles, depth, K=K):
    tiles = planner.token_tiles_for(M)
    rt = row_tiles if tiles <= 2 else 1
    return FusedPlan(tuple(Plan("cuda", mode, bits, group_size, N, K, warps, tiles, depth, rt) for N in Ns))


def written(y):
    assert not mx.isnan(y).any().item(), "outputs left unwritten (NaN poison)"
    return y


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_multi_is_the_dense_kernel_bit_for_bit(config):
    mode, bits, group_size, dtype, warps, row_tiles, depth = config
    Ns = (1001, 255, 255)  # q, k, v: odd N, not multiples of a row tile
    weights = [quantized(N, mode, bits, group_size, dtype, seed=i + bits) for i, N in enumerate(Ns)]
    for M in MS:
        x = mx.random.normal((M, K)).astype(dtype)
        fp = fused_plan(M, Ns, mode, bits, group_size, warps, row_tiles, depth)
        ys = launch.dense_multi(fp, x, weights, poison=math.nan)
        assert len(ys) == 3
        for p, w, y in zip(fp.members, weights, ys):
            alone = written(launch.dense(p, x, *w, poison=math.nan))
            assert y.shape == (M, p.N) and mx.array_equal(written(y), alone).item(), (config, M, p.N)
        if config is CONFIGS[0]:  # two weights (gate/up shaped): the third slot is empty
            two = FusedPlan(fp.members[1:])
            for p, w, y in zip(two.members, weights[1:], launch.dense_multi(two, x, weights[1:], poison=math.nan)):
                assert mx.array_equal(written(y), launch.dense(p, x, *w)).item(), (config, M)


@pytest.mark.parametrize("config", GLU_CONFIGS, ids=GLU_IDS)
def test_glu_is_the_dense_kernels_then_mlx_swiglu_bit_for_bit(config):
    """g and u rounded to the activation type as the dense kernel stores them,
    then mlx-lm's (compiled) swiglu: the fused epilogue must give its bits."""
    mode, bits, group_size, dtype, warps, row_tiles, depth = config
    N = 999
    gate, up = (quantized(N, mode, bits, group_size, dtype, seed=s) for s in (11, 12))
    for M in MS:
        x = (mx.random.normal((M, K)) * 4).astype(dtype)  # gate values across silu's range
        fp = fused_plan(M, (N, N), mode, bits, group_size, warps, row_tiles, depth)
        y = written(launch.dense_glu(fp, x, gate, up, poison=math.nan))
        g = launch.dense(fp.members[0], x, *gate)
        u = launch.dense(fp.members[1], x, *up)
        expected = swiglu(g, u)
        mismatched = (y != expected).sum().item()
        assert y.shape == (M, N) and mismatched == 0, (config, M, mismatched)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_residual_is_the_dense_kernel_then_mlx_add_bit_for_bit(config):
    """The block's residual add in the dense kernel's epilogue: the product
    rounded as the dense kernel stores it, then MLX's add, to the bit."""
    mode, bits, group_size, dtype, warps, row_tiles, depth = config
    N = 1001
    w = quantized(N, mode, bits, group_size, dtype, seed=21)
    for M in MS:
        x = mx.random.normal((M, K)).astype(dtype)
        r = (mx.random.normal((M, N)) * 8).astype(dtype)  # residuals larger than the product, as in a model
        p = fused_plan(M, (N,), mode, bits, group_size, warps, row_tiles, depth).members[0]
        y = written(launch.dense_residual(p, x, *w, r, poison=math.nan))
        expected = r + launch.dense(p, x, *w)
        mismatched = (y != expected).sum().item()
        assert y.shape == (M, N) and mismatched == 0, (config, M, mismatched)


def rel_err(y, ref):
    y, ref = y.astype(mx.float32), ref.astype(mx.float32)
    return (mx.linalg.norm(y - ref) / mx.linalg.norm(ref)).item()


def test_close_to_mx_quantized_matmul():
    """Llama-3-8B's q/k/v and gate/up shapes against MLX's op (which rounds differently)."""
    K = 4096
    qkv = [quantized(N, "affine", 4, 64, mx.bfloat16, i, K) for i, N in enumerate((4096, 1024, 1024))]
    gate, up = (quantized(14336, "affine", 4, 64, mx.bfloat16, s, K) for s in (5, 6))
    for M in (1, 4):
        x = mx.random.normal((M, K)).astype(mx.bfloat16)
        fp = fused_plan(M, (4096, 1024, 1024), "affine", 4, 64, 4, 1, 1, K)
        for y, w in zip(launch.dense_multi(fp, x, qkv, poison=math.nan), qkv):
            assert rel_err(written(y), mx.quantized_matmul(x, *w)) < 1e-2
        glu = fused_plan(M, (14336, 14336), "affine", 4, 64, 2, 1, 1, K)
        ref = swiglu(mx.quantized_matmul(x, *gate), mx.quantized_matmul(x, *up))
        assert rel_err(written(launch.dense_glu(glu, x, gate, up, poison=math.nan)), ref) < 2e-2


PROMPT = mx.array(list(range(5, 12)))  # 7 tokens: one token tile, like decode


def forward(model):
    cache = make_prompt_cache(model)
    prefill = model(PROMPT[None], cache=cache)
    decode = model(mx.array([[7]]), cache=cache)
    mx.eval(prefill, decode)
    return prefill, decode


@pytest.fixture
def launches(monkeypatch):
    seen = []
    for name in ("dense_multi", "dense_glu", "dense_residual"):
        real = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, _n=name, _r=real, **k: seen.append(_n) or _r(*a, **k))
    return seen


def small(tmp_path, family):
    """ "small" widths (every K >= 128), so that the planner takes every projection."""
    return mlx_lm.load(str(synthetic.write_model(tmp_path / "m", family, "small")))[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patched_model_with_the_fused_path_is_the_unfused_one(tmp_path, family, launches):
    """With the split forced, the patched model takes the split-K kernel for
    every projection; fusing them changes the launches, not one bit of the
    logits, which stay within bf16 tolerance of the unpatched model's."""
    model = small(tmp_path, family)
    expected = forward(model)
    with planner.split(4), patch.enabled():  # patch.enable() fuses: unfuse for the reference
        fused.disable()
        unfused = forward(model)
        fused.enable()
        together = forward(model)
    assert set(launches) == {"dense_multi", "dense_glu", "dense_residual"}
    for a, b, c in zip(expected, unfused, together):
        assert mx.isfinite(c).all().item() and rel_err(c, a) < 2e-2
        assert mx.array_equal(b, c).item(), np.abs(np.array((b - c).astype(mx.float32))).max()


BLOCKS = [  # (family, module path, kind of launch): the fused blocks of the MoE families
    ("qwen3_moe", "layers.0.self_attn", "dense_multi"),
    ("mixtral", "layers.0.self_attn", "dense_multi"),
    ("deepseek_v3", "layers.0.mlp", "dense_glu"),  # a dense layer
    ("deepseek_v3", "layers.1.mlp.shared_experts", "dense_glu"),
]


@pytest.mark.parametrize("family,path,kind", BLOCKS, ids=[f"{f}-{p}" for f, p, _ in BLOCKS])
def test_patched_blocks_of_moe_models(tmp_path, family, path, kind, launches):
    """The same for the fused blocks of the MoE families, called alone (their
    whole models would spend a minute in MLX's own MoE kernels' JIT)."""
    module = small(tmp_path, family)
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    first = module.q_proj if hasattr(module, "q_proj") else module.gate_proj
    x = mx.random.normal((1, 7, first.weight.shape[1] * 32 // first.bits)).astype(mx.bfloat16)
    expected = module(x)
    with planner.split(4), patch.enabled():
        fused.disable()
        unfused = module(x)
        fused.enable()
        together = module(x)
    assert launches == [kind]
    assert mx.isfinite(together).all().item() and rel_err(together, expected) < 2e-2
    assert mx.array_equal(unfused, together).item()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("M", [3, 40])  # 6 pairs unsorted, 80 sorted
def test_patched_switch_glu_is_the_unfused_grouped_kernels(tmp_path, family, M, monkeypatch):
    """SwitchGLU's gate/up in one grouped launch with the activation: not one bit
    from the two grouped calls and mlx-lm's swiglu, within bf16 tolerance of MLX."""
    from mlx_lm.models.switch_layers import SwitchGLU

    model = small(tmp_path, family)
    block = next(m for _, m in model.named_modules() if isinstance(m, SwitchGLU))
    E, K = block.gate_proj["weight"].shape[0], block.gate_proj["weight"].shape[2] * 32 // block.gate_proj.bits
    rng = np.random.default_rng(M)
    idx = mx.array(np.stack([rng.choice(E, 2, replace=False) for _ in range(M)])[None].astype(np.uint32))
    x = mx.random.normal((1, M, K)).astype(mx.bfloat16)
    expected = block(x, idx)
    seen = []
    real = launch.gather_glu
    monkeypatch.setattr(launch, "gather_glu", lambda *a, **k: seen.append(1) or real(*a, **k))
    with planner.split(2), patch.enabled():
        fused.disable()
        unfused = block(x, idx)
        fused.enable()
        together = block(x, idx)
    assert seen == [1] and together.shape == expected.shape
    assert mx.isfinite(together).all().item() and rel_err(together, expected) < 2e-2
    assert mx.array_equal(unfused, together).item()
