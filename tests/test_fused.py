"""Fused projections (mtp_splitk.fused) on the CPU: the planner's rule, the
launchers' calls, the fused kernels' compile (nvcc) and their Metal mirror
run through the C++ shim against the unfused kernel, the runtime's routing
and derivatives, and the patch of mlx-lm's attention and MLP blocks (copies
of the originals, reversible, models bit-identical)."""

import ast
import builtins
import inspect
import os
import re
import shutil
import subprocess
import textwrap
from copy import deepcopy

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models import qwen3_moe
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import make_prompt_cache

import test_metal as shim
from conftest import KernelRecorder

from mtp_splitk import fused, launch, ops, patch, synthetic
from mtp_splitk import plan as planner
from mtp_splitk.launch import cuda, metal
from mtp_splitk.plan import Device, FusedPlan, Plan

H200 = Device("cuda", "NVIDIA H200", 132)
APPLE = Device("metal", "Apple M-test", 10)


def qlinear(K, N, mode="affine", bits=4, group_size=64, bias=False, dtype=mx.bfloat16, seed=0):
    mx.random.seed(seed)
    layer = nn.QuantizedLinear(K, N, bias=bias, group_size=group_size, bits=bits, mode=mode)
    layer.update(tree_map(lambda p: p.astype(dtype) if p.dtype == mx.float32 else p, layer.parameters()))
    return layer


def triple(layer):
    return layer["weight"], layer["scales"], layer.get("biases")


def plan(backend, M, N, K, mode="affine", bits=4, group_size=64, warps=2, depth=1, row_tiles=1):
    return Plan(backend, mode, bits, group_size, N, K, warps, planner.token_tiles_for(M), depth, row_tiles)


@pytest.fixture(autouse=True)
def _unfused():
    fused.disable()
    yield
    fused.disable()


# -- the planner ---------------------------------------------------------------------------


def test_plan_multi_only_where_each_weight_is_planned_with_one_split(monkeypatch):
    """Fused and unfused agree on the path: a plan only where plan_dense plans
    every weight at this M, and only with one split (the field that fixes a
    row's arithmetic); depth and row tiles follow the weight with most rows."""
    table = {
        "m_range": {"affine4:4096x4096": [3, 7], "affine4:1024x4096": [5, 7]},
        "warps_k": {"4096x4096": 4},
        "depth": {"4096x4096": 2},
        "row_tiles": {"4096x4096": 2},
    }
    monkeypatch.setattr(planner, "load_tuning", lambda name: table)
    qkv = (4096, 1024, 1024)
    args = (4096, 4, 64, "affine", mx.bfloat16, H200)
    assert planner.plan_multi(3, qkv, *args) is None  # k and v are not planned at M = 3
    assert planner.plan_dense(5, 1024, *args) is not None
    # M = 5: all planned, but k/v's split (choose_warps_k: 8) is not q's (4).
    assert planner.plan_dense(5, 1024, *args).warps_k == 8
    assert planner.plan_multi(5, qkv, *args) is None
    table["warps_k"]["1024x4096"] = 4
    fp = planner.plan_multi(5, qkv, *args)
    assert [p.N for p in fp.members] == list(qkv)
    for p in fp.members:
        alone = planner.plan_dense(5, p.N, *args)
        assert (p.warps_k, p.token_tiles, p.K, p.mode) == (alone.warps_k, alone.token_tiles, 4096, "affine")
        assert (p.depth, p.row_tiles) == (2, 2)
    assert fp.blocks == 4096 // 32 + 2 * (1024 // 32)
    assert planner.plan_multi(8, qkv, *args) is None  # past every weight's range
    assert planner.plan_multi(5, (4096,), *args) is None  # nothing to fuse
    assert planner.plan_multi(5, qkv + (1024,), *args) is None  # the kernel takes three at most
    with planner.split(0):
        assert planner.plan_multi(5, qkv, *args) is None


def test_plan_glu_declines_what_its_block_cannot_hold():
    args = (2048, 4, 64, "affine", mx.bfloat16)
    for warps in planner.WARP_CHOICES:
        with planner.split(warps):
            glu = planner.plan_glu(4, 1000, *args, H200)
            assert (glu is not None) == (2 * warps <= 8), warps  # 2 x split warps a block
            assert planner.plan_multi(4, (1000, 1000), *args, H200) is not None
            assert planner.plan_glu(4, 1000, *args, APPLE) is None  # no Metal activation kernel
    assert planner.plan_glu(4, 1000, *args, Device("cpu", "cpu", 0)) is None


# -- the launchers, recorded ---------------------------------------------------------------


@pytest.fixture
def cuda_recorder(monkeypatch):
    rec = KernelRecorder()
    monkeypatch.setattr(mx.fast, "cuda_kernel", rec)
    launchers = (cuda.dense_launch, cuda.multi_launch, cuda.glu_launch, cuda.gather_glu_launch, cuda.residual_launch)
    for f in launchers:
        f.cache_clear()
    yield rec
    for f in launchers:
        f.cache_clear()


def test_cuda_multi_launch(cuda_recorder):
    K = 256
    layers = [qlinear(K, N, seed=i) for i, N in enumerate((40, 24, 24))]
    x = mx.random.normal((5, K)).astype(mx.bfloat16)
    fp = FusedPlan(tuple(plan("cuda", 5, N, K) for N in (40, 24, 24)))
    ys = launch.dense_multi(fp, x, [triple(l) for l in layers])
    assert [y.shape for y in ys] == [(5, 40), (5, 24), (5, 24)]
    (kernel,) = cuda_recorder.kernels
    assert kernel["source"] == (
        "splitk_qmm_multi<__nv_bfloat16, __nv_bfloat16, 0, 4, 64, 2, 1, 1, true, 1, false>(x, x_shape[0], x_shape[1], "
        "w0, scales0, biases0, y0, 40, w1, scales1, biases1, y1, 24, w2, scales2, biases2, y2, 24);"
    )
    assert kernel["input_names"] == ["x", "w0", "scales0", "biases0", "w1", "scales1", "biases1", "w2",
                                     "scales2", "biases2"]
    assert kernel["output_names"] == ["y0", "y1", "y2"]
    assert kernel["header"] == cuda._cuda_header()  # the include line only
    assert kernel["shared_memory"] == 2 * 1 * 1 * 32 * 16  # the dense kernel's
    assert kernel["name"].startswith("mtp_splitk_multi_affine_")
    (call,) = cuda_recorder.calls
    assert [id(a) for a in call["inputs"]] == [id(x)] + [id(a) for l in layers for a in triple(l)]
    assert call["grid"] == ((3 + 2 + 2) * 64, 1, 1) and call["threadgroup"] == (64, 1, 1)
    assert call["output_shapes"] == [(5, 40), (5, 24), (5, 24)] and call["init_value"] is None

    # Two fp-mode weights: no biases, and the third slot is the second with N = 0.
    fp_layers = [qlinear(K, 48, "mxfp4", 4, 32, seed=i) for i in range(2)]
    two = FusedPlan(tuple(plan("cuda", 13, 48, K, "mxfp4", 4, 32, warps=4, row_tiles=2) for _ in range(2)))
    launch.dense_multi(two, x, [triple(l) for l in fp_layers], poison=float("nan"))
    kernel, call = cuda_recorder.kernels[1], cuda_recorder.calls[1]
    assert kernel["source"].endswith(
        "(x, x_shape[0], x_shape[1], w0, scales0, (const uint8_t*)nullptr, y0, 48, "
        "w1, scales1, (const uint8_t*)nullptr, y1, 48, w1, scales1, (const uint8_t*)nullptr, y1, 0);"
    )
    assert kernel["source"].startswith("splitk_qmm_multi<__nv_bfloat16, uint8_t, 1, 4, 32, 4, 2, 2, false, 1, false>")
    assert kernel["input_names"] == ["x", "w0", "scales0", "w1", "scales1"]
    assert call["grid"] == (2 * 2 * 128, 1, 1)  # ceil(48 / 32) row tiles per weight
    assert np.isnan(call["init_value"])


def test_cuda_glu_launch(cuda_recorder):
    K = 256
    gate, up = qlinear(K, 72, seed=1), qlinear(K, 72, seed=2)
    x = mx.random.normal((3, K)).astype(mx.float16)
    fp = FusedPlan((plan("cuda", 3, 72, K, warps=4),) * 2)
    y = launch.dense_glu(fp, x, triple(gate), triple(up))
    assert y.shape == (3, 72) and y.dtype == mx.float16
    (kernel,) = cuda_recorder.kernels
    assert kernel["source"] == (
        "splitk_qmm_glu<__half, __nv_bfloat16, 0, 4, 64, 4, 1, 1, false, 1, false>(x, w0, scales0, biases0, "
        "w1, scales1, biases1, y, x_shape[0], 72, x_shape[1], "
        "[](__half g, __half u) { return Multiply{}(Multiply{}(g, Sigmoid{}(g)), u); });"
    )
    # MLX's own elementwise functors, then our kernel file.
    assert kernel["header"] == ('#include "mlx/backend/cuda/device/unary_ops.cuh"\n'
                                '#include "mlx/backend/cuda/device/binary_ops.cuh"\n' + cuda._cuda_header())
    assert kernel["shared_memory"] == 2 * (4 * 1 * 1 * 32 * 16)  # both weights' partials
    (call,) = cuda_recorder.calls
    assert call["grid"] == (5 * 256, 1, 1) and call["threadgroup"] == (256, 1, 1)  # 2 x 4 warps a block
    assert call["output_shapes"] == [(3, 72)]
    with pytest.raises(ValueError, match="no metal kernel"):
        launch.dense_glu(FusedPlan((plan("metal", 3, 72, K),) * 2), x, triple(gate), triple(up))


def test_cuda_residual_launch(cuda_recorder):
    K = 256
    layer = qlinear(K, 72, seed=3)
    x = mx.random.normal((3, K)).astype(mx.bfloat16)
    r = mx.random.normal((3, 72)).astype(mx.bfloat16)
    y = launch.dense_residual(plan("cuda", 3, 72, K, warps=4), x, *triple(layer), r)
    assert y.shape == (3, 72) and y.dtype == mx.bfloat16
    (kernel,) = cuda_recorder.kernels
    assert kernel["source"] == (
        "splitk_qmm_residual<__nv_bfloat16, __nv_bfloat16, 0, 4, 64, 4, 1, 1, true, 1, false>(x, w, scales, biases, r, y, "
        "x_shape[0], w_shape[0], x_shape[1], [](__nv_bfloat16 a, __nv_bfloat16 b) { return Add{}(a, b); });"
    )
    assert kernel["input_names"] == ["x", "w", "scales", "biases", "r"]
    assert kernel["header"].endswith(cuda._cuda_header()) and "binary_ops.cuh" in kernel["header"]
    (call,) = cuda_recorder.calls
    assert call["inputs"][-1] is r and call["grid"] == (5 * 128, 1, 1) and call["threadgroup"] == (128, 1, 1)
    with pytest.raises(ValueError, match="no metal kernel"):
        launch.dense_residual(plan("metal", 3, 72, K), x, *triple(layer), r)


# Stand-ins for MLX's device headers, which NVRTC gets from MLX's library and
# this machine lacks: the names and signatures the glu body uses, nothing more.
_MLX_STANDIN = {
    "unary_ops.cuh": """#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
namespace mlx::core::cu {
struct Sigmoid {
  template <typename T>
  __device__ T operator()(T x) {
    float y = 1.f / (1.f + expf(-static_cast<float>(x)));
    return static_cast<T>(y);
  }
};
}
""",
    "binary_ops.cuh": """#pragma once
namespace mlx::core::cu {
struct Multiply {
  template <typename T>
  __device__ T operator()(T x, T y) { return x * y; }
};
}
""",
}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on this machine's PATH")
def test_fused_kernels_compile_with_nvcc(cuda_recorder, tmp_path):
    """The bodies and headers as the launcher writes them, inside a wrapper
    shaped like mx.fast.cuda_kernel's (in MLX's namespace), for 1 and 8 token
    tiles of an affine and an fp mode, and the grouped gate/up launch: they
    compile for sm_90 without spills."""
    K = 256
    for mode, bits, group_size in (("affine", 4, 64), ("mxfp4", 4, 32)):
        layers = [qlinear(K, N, mode, bits, group_size, seed=i) for i, N in enumerate((40, 24, 24))]
        for M in (1, 64):
            x = mx.zeros((M, K), mx.bfloat16)
            fp = FusedPlan(tuple(plan("cuda", M, N, K, mode, bits, group_size) for N in (40, 24, 24)))
            launch.dense_multi(fp, x, [triple(l) for l in layers])
            glu = FusedPlan((plan("cuda", M, 40, K, mode, bits, group_size),) * 2)
            launch.dense_glu(glu, x, triple(layers[0]), triple(layers[0]))
        # The grouped gate/up launch (SwitchGLU's), its depth-3 variant too: experts stacked.
        experts = tuple(None if a is None else a[None] for a in triple(layers[0]))
        for depth in (1, 3):
            moe = Plan("cuda", mode, bits, group_size, 40, K, 2, 1, depth)
            launch.gather_glu(moe, mx.zeros((5, K), mx.bfloat16), experts, experts, mx.zeros((10,), mx.uint32), 2)
    include = tmp_path / "mlx" / "backend" / "cuda" / "device"
    include.mkdir(parents=True)
    for name, text in _MLX_STANDIN.items():
        (include / name).write_text(text)
    src = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n"
    src += cuda._MLX_OPS + cuda._cuda_header() + "namespace mlx::core::cu {\n"
    for i, k in enumerate(cuda_recorder.kernels):
        fp_mode = ", uint8_t," in k["source"]
        params = [f"const {'uint32_t' if n[0] in 'wi' else 'uint8_t' if fp_mode and n[0] == 's' else '__nv_bfloat16'}"
                  f"* {n}, const int* {n}_shape" for n in k["input_names"]]
        params += [f"__nv_bfloat16* {n}" for n in k["output_names"]]
        src += f"__global__ void k{i}({', '.join(params)}) {{\n{k['source']}\n}}\n"
    path = tmp_path / "fused.cu"
    path.write_text(src + "}\n")
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-I", str(tmp_path),
                        "-o", str(tmp_path / "fused.cubin"), str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(spills) == len(cuda_recorder.kernels) == 12
    assert all(s == ("0", "0") for s in spills), r.stderr


@pytest.fixture
def metal_recorder(monkeypatch):
    rec = KernelRecorder()
    monkeypatch.setattr(mx.fast, "metal_kernel", rec)
    _clear_metal()
    yield rec
    _clear_metal()


def _clear_metal():
    shim._clear_caches()
    metal._multi_kernel.cache_clear()
    metal.multi_launch.cache_clear()


def test_metal_multi_launch(metal_recorder):
    K = 256
    layers = [qlinear(K, N, seed=i) for i, N in enumerate((40, 24, 24))]
    x = mx.random.normal((5, K)).astype(mx.bfloat16)
    fp = FusedPlan(tuple(plan("metal", 5, N, K) for N in (40, 24, 24)))
    launch.dense_multi(fp, x, [triple(l) for l in layers])
    (kernel,) = metal_recorder.kernels
    assert kernel["name"].startswith("mtp_splitk_multi3_affine_")
    assert kernel["header"] == launch.read_source("splitk_qmm.metal")
    assert "w0, scales0, biases0, y0, N0, w1, scales1, biases1, y1, N1, w2, scales2, biases2, y2, N2" in (
        kernel["source"])
    (call,) = metal_recorder.calls
    assert call["template"][-3:] == [("N0", 40), ("N1", 24), ("N2", 24)]
    assert dict(call["template"])["WK"] == 2 and call["grid"] == (7 * 64, 1, 1)
    assert call["output_shapes"] == [(5, 40), (5, 24), (5, 24)]
    for pattern in shim.CUDA_ONLY + shim.NOT_MSL:
        assert not re.search(pattern, kernel["source"]), pattern


# The Metal mirror through the shim: each fused output against the dense
# kernel for that weight alone, bit for bit.
SHIM_CASES = [
    # (name, M, Ns, K, mode, bits, group_size, dtype, warps, row_tiles, depth)
    ("qkv_affine4", 5, (40, 24, 24), 256, "affine", 4, 64, mx.bfloat16, 2, 1, 1),
    ("qkv_mxfp4_nt2", 13, (40, 24, 24), 256, "mxfp4", 4, 32, mx.bfloat16, 2, 1, 1),
    ("gate_up_affine4_rt2", 3, (72, 72), 384, "affine", 4, 64, mx.bfloat16, 4, 2, 2),
    ("gate_up_mxfp4", 2, (48, 48), 256, "mxfp4", 4, 32, mx.bfloat16, 1, 1, 1),
    ("qkv_affine3_f16", 4, (56, 8, 8), 160, "affine", 3, 32, mx.float16, 2, 1, 1),
]


@pytest.fixture(scope="module")
def shim_outputs(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the Metal kernel cannot be compiled through the C++ shim")
    rec = KernelRecorder()
    original = mx.fast.metal_kernel
    mx.fast.metal_kernel = rec
    _clear_metal()
    spans = {}
    try:
        for name, M, Ns, K, mode, bits, group_size, dtype, warps, row_tiles, depth in SHIM_CASES:
            layers = [qlinear(K, N, mode, bits, group_size, dtype=dtype, seed=i) for i, N in enumerate(Ns)]
            x = (mx.random.normal((M, K), key=mx.random.key(len(spans))) * 2).astype(dtype)
            members = tuple(plan("metal", M, N, K, mode, bits, group_size, warps, depth, row_tiles) for N in Ns)
            first = len(rec.calls)
            for p, layer in zip(members, layers):
                launch.dense(p, x, *triple(layer))
            launch.dense_multi(FusedPlan(members), x, [triple(l) for l in layers])
            spans[name] = (first, len(Ns))
    finally:
        mx.fast.metal_kernel = original
        _clear_metal()
    workdir = str(tmp_path_factory.mktemp("fused_shim"))
    src = os.path.join(workdir, "kernels.cpp")
    with open(src, "w") as f:
        f.write(shim._build_program(rec.calls, workdir))
    exe = os.path.join(workdir, "kernels")
    build = shim.compile_program(gxx, src, exe)
    assert build.returncode == 0, build.stderr[-6000:]
    assert "warning" not in build.stderr, build.stderr[-6000:]
    run = subprocess.run([exe, workdir] + [str(n) for n in range(len(rec.calls))], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-6000:]

    def outputs(n):
        call = rec.calls[n]
        return [shim._load(os.path.join(workdir, f"{n}_out{i}.bin"), s, d)
                for i, (s, d) in enumerate(zip(call["output_shapes"], call["output_dtypes"]))]

    return {name: ([outputs(first + i)[0] for i in range(count)], outputs(first + count))
            for name, (first, count) in spans.items()}


@pytest.mark.parametrize("name", [c[0] for c in SHIM_CASES])
def test_metal_multi_is_the_dense_kernel_for_each_weight(shim_outputs, name):
    alone, together = shim_outputs[name]
    assert len(alone) == len(together)
    for a, b in zip(alone, together):
        assert not np.isnan(np.array(b.astype(mx.float32))).any()  # every output written (NaN poison)
        a, b = np.array(a.view(mx.uint16)), np.array(b.view(mx.uint16))
        assert a.shape == b.shape and (a == b).all()


# -- the runtime ---------------------------------------------------------------------------


def test_linears_are_the_layers_own_calls_on_the_cpu():
    layers = [qlinear(128, 64, seed=0), qlinear(128, 32, bias=True, seed=1), qlinear(128, 32, seed=2)]
    x = mx.random.normal((2, 3, 128)).astype(mx.bfloat16)
    for got, layer in zip(fused.linears(x, layers), layers):
        assert mx.array_equal(got, layer(x)).item()
    gate, up = qlinear(128, 96, seed=3), qlinear(128, 96, seed=4)
    assert mx.array_equal(fused.swiglu_mlp(x, gate, up), swiglu(gate(x), up(x))).item()
    plain = [nn.Linear(128, 16), nn.Linear(128, 16)]  # not quantized: the layers' calls
    assert all(mx.array_equal(a, l(x)).item() for a, l in zip(fused.linears(x, plain), plain))


@pytest.fixture
def on_metal(monkeypatch, metal_recorder):
    """A pretend Apple GPU with the split forced: the fused path is planned and
    its kernels recorded (they return zeros)."""
    monkeypatch.setattr(planner, "current_device", lambda: APPLE)
    ops.clear_cache()
    with planner.split(2):
        yield metal_recorder
    ops.clear_cache()


def test_linears_take_one_launch_where_planned(on_metal):
    rec = on_metal
    layers = [qlinear(256, 40, seed=0), qlinear(256, 24, bias=True, seed=1), qlinear(256, 24, seed=2)]
    layers[1].bias = mx.arange(24).astype(mx.bfloat16)
    x = mx.random.normal((1, 5, 256)).astype(mx.bfloat16)
    q, k, v = fused.linears(x, layers)
    assert (q.shape, k.shape, v.shape) == ((1, 5, 40), (1, 5, 24), (1, 5, 24))
    assert mx.array_equal(k, mx.broadcast_to(layers[1].bias, (1, 5, 24))).item()  # zeros + the bias
    (call,) = rec.calls
    assert call["inputs"][0].shape == (5, 256)
    # (custom_function hands the kernel its own handles of the same arrays)
    given = [a for l in layers for a in triple(l)]
    assert len(call["inputs"]) == 1 + len(given)
    assert all(a.dtype == b.dtype and mx.array_equal(a, b).item() for a, b in zip(call["inputs"][1:], given))
    assert dict(call["template"])["WK"] == 2 and call["template"][-3:] == [("N0", 40), ("N1", 24), ("N2", 24)]
    fused.linears(x, layers)
    assert len(rec.calls) == 2 and len(rec.kernels) == 1  # the route and kernel are reused
    # Layers the kernel cannot take together: each layer's own call (here
    # patched, so two dense launches).
    odd = [layers[0], qlinear(256, 24, bits=8, seed=5)]
    before = len(rec.calls)
    with patch.enabled():
        fused.linears(x, odd)
    assert len(rec.calls) == before + 2
    assert [c["kernel"]["name"].split("_")[2] for c in rec.calls[-2:]] == ["qmm", "qmm"]
    with planner.split(0):  # MLX for everything: bit for bit the layers' calls
        assert all(mx.array_equal(a, l(x)).item() for a, l in zip(fused.linears(x, layers), layers))
    assert len(rec.calls) == before + 2


def test_swiglu_mlp_on_metal_is_one_launch_and_mlx_swiglu(on_metal, monkeypatch):
    rec = on_metal
    gate, up = qlinear(256, 48, seed=0), qlinear(256, 48, seed=1)
    seen = []
    monkeypatch.setattr(fused, "swiglu", lambda g, u: seen.append((g.shape, u.shape)) or swiglu(g, u))
    y = fused.swiglu_mlp(mx.random.normal((3, 256)).astype(mx.bfloat16), gate, up)
    assert y.shape == (3, 48) and seen == [((3, 48), (3, 48))]
    (call,) = rec.calls
    assert call["kernel"]["output_names"] == ["y0", "y1"]


def test_swiglu_mlp_on_cuda_fuses_the_activation(monkeypatch, cuda_recorder):
    monkeypatch.setattr(planner, "current_device", lambda: H200)
    gate, up = qlinear(256, 48, seed=0), qlinear(256, 48, seed=1)
    x = mx.random.normal((2, 256)).astype(mx.bfloat16)
    def launched():
        names = [c["kernel"]["name"].split("_")[2] for c in cuda_recorder.calls]
        cuda_recorder.calls.clear()
        return names

    for warps, kernels in ((4, ["glu"]), (8, ["multi"])):  # 2 x 8 warps is past the block limit
        with planner.split(warps):
            assert fused.swiglu_mlp(x, gate, up).shape == (2, 48)
        assert launched() == kernels
    with planner.split(4):
        fused.swiglu_mlp(x, gate, up)
        gate.bias = mx.zeros((48,), mx.bfloat16)  # comes before the activation: not fused into it
        fused.swiglu_mlp(x, gate, up)
    assert launched() == ["glu", "multi"]


def test_linear_residual_on_cuda_adds_in_the_kernel(monkeypatch, cuda_recorder):
    """One launch where the planner takes the layer on CUDA; the layer's own
    call and MLX's add (bit for bit the original block's) everywhere else."""
    monkeypatch.setattr(planner, "current_device", lambda: H200)
    layer = qlinear(256, 48, seed=0)
    x = mx.random.normal((1, 5, 256)).astype(mx.bfloat16)
    r = mx.random.normal((1, 5, 48)).astype(mx.bfloat16)
    with planner.split(4):
        assert fused.linear_residual(layer, x, r).shape == (1, 5, 48)
        (call,) = cuda_recorder.calls
        assert call["kernel"]["name"].split("_")[2] == "residual" and call["inputs"][-1].shape == (5, 48)
        cuda_recorder.calls.clear()
        for residual in (None, r.astype(mx.float16)):  # no residual; one the kernel cannot add in its type
            expected = layer(x) if residual is None else residual + layer(x)
            assert mx.array_equal(fused.linear_residual(layer, x, residual), expected).item()
        layer.bias = mx.ones((48,), mx.bfloat16)  # added before the residual: not in the epilogue
        assert mx.array_equal(fused.linear_residual(layer, x, r), r + layer(x)).item()
    with planner.split(0):
        del layer.bias
        assert mx.array_equal(fused.linear_residual(layer, x, r), r + layer(x)).item()
    assert cuda_recorder.calls == []
    monkeypatch.setattr(planner, "current_device", lambda: APPLE)  # no Metal epilogue
    with planner.split(4):
        assert mx.array_equal(fused.linear_residual(layer, x, r), r + layer(x)).item()


def test_residual_path_has_mlx_derivatives(monkeypatch, cuda_recorder):
    """The recorded kernel returns zeros: the gradients come from the rule alone."""
    monkeypatch.setattr(planner, "current_device", lambda: H200)
    layer = qlinear(256, 48, dtype=mx.float16, seed=1)
    x, r = mx.random.normal((3, 256)).astype(mx.float16), mx.random.normal((3, 48)).astype(mx.float16)
    c = mx.random.normal((3, 48)).astype(mx.float16)
    loss = lambda x, r: (fused.linear_residual(layer, x, r) * c).sum()
    with planner.split(4):
        ours = mx.grad(loss, argnums=(0, 1))(x, r)
    assert cuda_recorder.calls
    with planner.split(0):
        theirs = mx.grad(loss, argnums=(0, 1))(x, r)
    assert all(mx.allclose(a, b, rtol=1e-3, atol=1e-3).item() for a, b in zip(ours, theirs))


def test_blocks_hand_their_residuals_to_the_last_projections(monkeypatch, cuda_recorder, tmp_path):
    """A patched llama block on CUDA: both residual adds in the o and down
    projections' launches, no add of MLX's left in the block."""
    monkeypatch.setattr(planner, "current_device", lambda: H200)
    model = mlx_lm.load(str(synthetic.write_model(tmp_path / "llama", "llama", "small")))[0]  # every K >= 128
    block = model.layers[0]
    D = block.input_layernorm.weight.shape[0]
    x = mx.random.normal((1, 5, D)).astype(mx.bfloat16)
    fused.enable()
    with planner.split(2), patch.enabled():
        block(x)
    names = [c["kernel"]["name"].split("_")[2] for c in cuda_recorder.calls]
    assert names == ["multi", "residual", "glu", "residual"], names


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 64), ("mxfp4", 4, 32)])
def test_fused_path_has_mlx_derivatives(on_metal, mode, bits, group_size):
    """The kernels return zeros here (recorded), so the gradients come from the
    derivative rule alone: they must be MLX's own ops'."""
    layers = [qlinear(256, N, mode, bits, group_size, dtype=mx.float16, seed=i) for i, N in enumerate((40, 24))]
    x = mx.random.normal((3, 256)).astype(mx.float16)
    c = [mx.random.normal((3, N)).astype(mx.float16) for N in (40, 24)]

    def loss(fn, x):
        return sum((y * w).sum() for y, w in zip(fn(x), c))

    ours = mx.grad(lambda x: loss(lambda x: fused.linears(x, layers), x))(x)
    with planner.split(0):
        theirs = mx.grad(lambda x: loss(lambda x: [l(x) for l in layers], x))(x)
    assert on_metal.calls and mx.allclose(ours, theirs, rtol=1e-3, atol=1e-3).item()
    _, tangents = mx.jvp(lambda x: fused.linears(x, layers), [x], [mx.ones_like(x)])
    with planner.split(0):
        _, expected = mx.jvp(lambda x: [l(x) for l in layers], [x], [mx.ones_like(x)])
    assert all(mx.allclose(a, b, rtol=1e-3, atol=1e-2).item() for a, b in zip(tangents, expected))


# -- the patch -----------------------------------------------------------------------------


def _unswap_switch_glu(body):
    """Statements holding switch_glu(x, idx, up, gate, act, s) as SwitchGLU
    writes them: x_up = up(x, idx, sorted_indices=s); x_gate = gate(...); then
    the statement with act(x_up, x_gate) in the call's place."""
    out = []
    for stmt in body:
        found = [n for n in ast.walk(stmt) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "switch_glu"]
        if found:
            x, idx, up, gate, act, sort = found[0].args
            for name, proj in (("x_up", up), ("x_gate", gate)):
                out.append(ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=ast.Call(
                    func=proj, args=[x, idx], keywords=[ast.keyword(arg="sorted_indices", value=sort)])))

            class Swap(ast.NodeTransformer):
                def visit_Call(self, node):
                    self.generic_visit(node)
                    if getattr(node.func, "id", None) != "switch_glu":
                        return node
                    return ast.Call(func=act, args=[ast.Name(id="x_up", ctx=ast.Load()),
                                                    ast.Name(id="x_gate", ctx=ast.Load())], keywords=[])

            stmt = Swap().visit(deepcopy(stmt))  # the copy's own tree stays as written
        out.append(stmt)
    return out


def _unswap_residual_call(body):
    """Statements t = residual_call(r, module, *args) as the blocks write them:
    r = module(*args); t = r_in + r."""
    out = []
    for stmt in body:
        value = getattr(stmt, "value", None)
        if isinstance(stmt, ast.Assign) and isinstance(value, ast.Call) and getattr(value.func, "id", None) == "residual_call":
            residual, module, *args = value.args
            r = ast.Name(id="r", ctx=ast.Store())
            out.append(ast.Assign(targets=[r], value=ast.Call(func=module, args=args, keywords=[])))
            stmt = ast.Assign(targets=stmt.targets, value=ast.BinOp(left=residual, op=ast.Add(),
                                                                   right=ast.Name(id="r", ctx=ast.Load())))
        out.append(stmt)
    return out


def _unswap(tree):
    """The copy's tree with the fused calls written back as the originals'
    projections: linears(x, (a, b, c)) -> a(x), b(x), c(x),
    swiglu_mlp(x, g, u) -> swiglu(g(x), u(x)), switch_glu as SwitchGLU's
    two projections and activation, linear_residual(layer, x, residual) ->
    layer(x) and residual_call as the block's add."""
    tree.body = _unswap_residual_call(_unswap_switch_glu(tree.body))

    class Unswap(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            name = getattr(node.func, "id", None)
            if name == "linears":
                x, layers = node.args
                return ast.Tuple(elts=[ast.Call(func=l, args=[x], keywords=[]) for l in layers.elts],
                                 ctx=ast.Load())
            if name == "linear_residual":
                layer, x, _ = node.args
                return ast.Call(func=layer, args=[x], keywords=[])
            if name == "swiglu_mlp":
                x, gate, up = node.args
                calls = [ast.Call(func=f, args=[x], keywords=[]) for f in (gate, up)]
                return ast.Call(func=ast.Name(id="swiglu", ctx=ast.Load()), args=calls, keywords=[])
            return node

    return Unswap().visit(tree)


def _function(function, unswap=False):
    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    body = ast.Module(body=tree.body, type_ignores=[])
    args = deepcopy(tree.args)
    if unswap:
        body = _unswap(body)
        if args.args[-1].arg == "residual":  # the copies' one added parameter
            args.args.pop(), args.defaults.pop()
    return tree, ast.dump(args) + ast.dump(body)


def _free_names(tree):
    bound = {a.arg for a in ast.walk(tree.args) if isinstance(a, ast.arg)}
    bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in bound}


@pytest.mark.parametrize("cls,name,replacement", fused.PATCHES,
                         ids=lambda p: getattr(p, "__qualname__", None))
def test_copies_are_the_originals_with_the_projections_swapped(cls, name, replacement):
    """If mlx-lm changes one of these methods this fails, instead of the
    patch replacing new logic with a stale copy."""
    original = vars(cls)[name]
    tree, copy = _function(replacement, unswap=True)
    assert copy == _function(original)[1]
    assert _function(replacement)[1] != copy  # it does call the fused functions
    # Every other global the copy reads is the object the original reads.
    fused_calls = {"linears", "swiglu_mlp", "switch_glu", "linear_residual", "residual_call"}
    for free in _free_names(tree) - fused_calls - set(dir(builtins)):
        assert replacement.__globals__[free] is original.__globals__[free], free
    if "swiglu_mlp" in _free_names(tree):
        assert original.__globals__["swiglu"] is fused.swiglu


def test_enable_disable_restore_the_original_functions():
    originals = {(cls, name): vars(cls)[name] for cls, name, _ in fused.PATCHES}
    fused.enable()
    fused.enable()  # idempotent
    assert fused.is_enabled()
    for cls, name, replacement in fused.PATCHES:
        assert vars(cls)[name] is replacement
    fused.disable()
    fused.disable()
    assert not fused.is_enabled()
    for (cls, name), original in originals.items():
        assert vars(cls)[name] is original


FAMILIES = ["llama", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3"]
PROMPT = mx.array(list(range(5, 25)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_models")
    return {f: mlx_lm.load(str(synthetic.write_model(root / f, f, "tiny")))[0] for f in FAMILIES}


def _forward(model):
    cache = make_prompt_cache(model)
    prefill = model(PROMPT[None], cache=cache)
    decode = model(mx.array([[7]]), cache=cache)
    mx.eval(prefill, decode)
    return prefill, decode


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_models_are_bit_identical_on_the_cpu(models, family, monkeypatch):
    model = models[family]
    expected = _forward(model)
    counts = {"linears": 0, "swiglu_mlp": 0}
    for fn in counts:
        real = getattr(fused, fn)
        monkeypatch.setattr(fused, fn, lambda *a, _f=fn, _r=real: counts.__setitem__(_f, counts[_f] + 1) or _r(*a))
    fused.enable()
    try:
        alone = _forward(model)
        with patch.enabled():  # with the ops patch too, as mtp_splitk.enable() will install both
            both = _forward(model)
    finally:
        fused.disable()
    for got in (alone, both):
        for a, b in zip(expected, got):
            assert a.dtype == b.dtype and mx.array_equal(a, b).item()
    layers = len(model.layers)
    attention = {"deepseek_v3": 0}.get(family, layers)  # MLA attention is not fused
    dense_mlps = {"llama": layers, "qwen3": layers, "deepseek_v3": 2}.get(family, 0)  # + a shared expert
    assert counts == {"linears": 4 * attention, "swiglu_mlp": 4 * dense_mlps}  # 2 forwards x 2 patch states


def test_qwen3_moe_dense_mlp():
    """qwen3_moe's dense MLP (its mlp_only_layers) takes the fused path too."""
    mlp = qwen3_moe.MLP(128, 192)
    nn.quantize(mlp, group_size=64, bits=4)
    x = mx.random.normal((1, 4, 128))
    expected = mlp(x)
    fused.enable()
    try:
        assert vars(qwen3_moe.MLP)["__call__"] is fused._mlp_call
        assert mx.array_equal(mlp(x), expected).item()
    finally:
        fused.disable()


def _switch_glu(E=8, N=128, K=256, seed=0):
    from mlx_lm.models.switch_layers import SwitchGLU

    mx.random.seed(seed)
    block = SwitchGLU(K, N, E)
    nn.quantize(block, group_size=64, bits=4)
    block.update(tree_map(lambda p: p.astype(mx.bfloat16) if p.dtype == mx.float32 else p, block.parameters()))
    block.eval()
    return block


def test_switch_glu_on_cuda_is_one_grouped_launch_for_gate_and_up(monkeypatch, cuda_recorder):
    """Patched, SwitchGLU's gate and up take one grouped launch with the activation
    (then the down projection its own), unsorted and sorted calls alike, where the
    grouped kernel is planned; at a split a block of both cannot hold, the two
    grouped calls as mlx-lm makes them."""
    from mtp_splitk import patch

    monkeypatch.setattr(planner, "current_device", lambda: H200)
    block = _switch_glu()

    def launched():
        kinds = [c["kernel"]["name"][len("mtp_splitk_"):].rsplit("_", 2)[0] for c in cuda_recorder.calls]
        cuda_recorder.calls.clear()
        return kinds

    with patch.enabled():
        for split, expected in ((2, ["gather_glu", "gather"]), (8, ["gather", "gather", "gather"])):
            with planner.split(split):
                for M in (3, 40):  # 6 pairs unsorted, 80 sorted (>= 64)
                    indices = mx.array(np.arange(2 * M).reshape(M, 2) % 8).astype(mx.uint32)
                    y = block(mx.random.normal((M, 256)).astype(mx.bfloat16), indices)
                    assert y.shape == (M, 2, 256) and launched() == expected, (split, M)
    block(mx.random.normal((3, 256)).astype(mx.bfloat16), mx.zeros((3, 2), mx.uint32))
    assert launched() == []  # unpatched: MLX's ops
