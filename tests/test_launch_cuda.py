# Copyright © 2026 mtp_splitk contributors

"""What mtp_splitk.launch hands mx.fast.cuda_kernel (recorded on the CPU), and that
the text it hands over compiles (with nvcc, where this machine has one)."""

import dataclasses
import os
import shutil
import subprocess

import mlx.core as mx
import pytest

from mtp_splitk import launch, plan as planner
from mtp_splitk.launch import common, cuda
from mtp_splitk.plan import Plan


@pytest.fixture
def recorder(monkeypatch, kernel_recorder):
    rec = kernel_recorder
    monkeypatch.setattr(mx.fast, "cuda_kernel", rec)
    cuda.dense_launch.cache_clear()
    cuda.gather_launch.cache_clear()
    yield rec
    cuda.dense_launch.cache_clear()
    cuda.gather_launch.cache_clear()


def cuda_plan(M, N, K, mode="affine", bits=4, group_size=64, warps=2, depth=1, row_tiles=1):
    return Plan("cuda", mode, bits, group_size, N, K, warps, planner.token_tiles_for(M), depth, row_tiles)


def quantized(shape, mode="affine", bits=4, group_size=64):
    parts = mx.quantize(mx.random.normal(shape).astype(mx.bfloat16) * 0.05, group_size, bits, mode=mode)
    return parts[0], parts[1], (parts[2] if mode == "affine" else None)


def test_dense_kernel_carries_the_plan_in_its_body(recorder):
    wq, s, b = quantized((40, 256))
    x = mx.random.normal((5, 256)).astype(mx.bfloat16)
    plan = cuda_plan(5, 40, 256, depth=2)
    y = launch.dense(plan, x, wq, s, b)
    launch.dense(plan, x, wq, s, b)
    assert y.shape == (5, 40)
    (kernel,) = recorder.kernels  # one object per plan, reused
    assert kernel["source"] == ("splitk_qmm<__nv_bfloat16, __nv_bfloat16, 0, 4, 64, 2, 1, 1, true, 2, false>"
                                "(x, w, scales, biases, y, x_shape[0], w_shape[0], x_shape[1]);")
    # Only an include of the kernel file travels with every call.
    path = os.path.join(common.kernel_dir(), "splitk_qmm.cu")
    assert kernel["header"] == f'#include "{path}"\n'
    assert kernel["name"].startswith("mtp_splitk_qmm_affine_")
    assert kernel["shared_memory"] == 2 * 1 * 1 * 32 * 16
    first, second = recorder.calls
    assert first["template"] is None and second["template"] is None
    assert first["grid"] == (3 * 64, 1, 1) and first["threadgroup"] == (64, 1, 1)


def test_each_plan_and_dtype_gets_its_own_kernel_name(recorder):
    wq, s, b = quantized((40, 256))
    x = mx.random.normal((5, 256)).astype(mx.bfloat16)
    launch.dense(cuda_plan(5, 40, 256), x, wq, s, b)
    launch.dense(cuda_plan(5, 40, 256, warps=4), x, wq, s, b)
    launch.dense(cuda_plan(5, 40, 256), x.astype(mx.float16), wq, s.astype(mx.float16), b.astype(mx.float16))
    wq4, s4, _ = quantized((40, 256), "mxfp4", 4, 32)
    launch.dense(cuda_plan(5, 40, 256, "mxfp4", 4, 32), x, wq4, s4, None)
    names = [k["name"] for k in recorder.kernels]
    assert len(set(names)) == 4
    assert "splitk_qmm<__half, __half, 0, 4, 64, 2, 1, 1, true, 1, false>" in recorder.kernels[2]["source"]
    assert recorder.kernels[3]["source"].startswith("splitk_qmm<__nv_bfloat16, uint8_t, 1, 4, 32,")
    assert "(const uint8_t*)nullptr" in recorder.kernels[3]["source"]
    assert recorder.kernels[3]["input_names"] == ["x", "w", "scales"]


def test_a_lean_plan_is_its_own_kernel_with_the_flag_in_its_body(recorder):
    wq, s, b = quantized((40, 256))
    x = mx.random.normal((5, 256)).astype(mx.bfloat16)
    launch.dense(cuda_plan(5, 40, 256), x, wq, s, b)
    launch.dense(dataclasses.replace(cuda_plan(5, 40, 256), lean=True), x, wq, s, b)
    plain, lean = recorder.kernels
    assert plain["name"] != lean["name"]
    assert lean["source"].startswith("splitk_qmm<__nv_bfloat16, __nv_bfloat16, 0, 4, 64, 2, 1, 1, true, 1, true>(")


def test_gather_kernel_bakes_in_the_row_divisor(recorder):
    wq, s, b = quantized((6, 48, 256))
    x = mx.random.normal((3, 256)).astype(mx.bfloat16)
    idx = mx.array([0, 5, 2, 5, 1, 3], mx.uint32)
    plan = cuda_plan(6, 48, 256)
    launch.gather(plan, x, wq, s, b, idx, 2)
    launch.gather(plan, x, wq, s, b, idx, 1)
    first, second = recorder.kernels
    assert first["source"].endswith("x_shape[1], 2);") and second["source"].endswith("x_shape[1], 1);")
    assert first["name"] != second["name"]
    assert first["input_names"] == ["x", "w", "scales", "biases", "idx"]
    assert recorder.calls[0]["template"] is None
    assert recorder.calls[0]["grid"] == (6 * 3 * 64, 1, 1)


def test_a_dtype_without_a_cuda_type_is_an_error(recorder):
    with pytest.raises(ValueError, match="no CUDA type"):
        cuda._cuda_call("splitk_qmm", cuda_plan(1, 16, 128), mx.int32, mx.int32)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on this machine's PATH")
def test_generated_kernels_compile_with_nvcc(recorder, tmp_path):
    """The include header and bodies as mtp_splitk.launch writes them, inside a
    wrapper shaped like the one mx.fast.cuda_kernel generates."""
    wq, s, b = quantized((40, 256))
    x = mx.random.normal((5, 256)).astype(mx.bfloat16)
    launch.dense(cuda_plan(5, 40, 256), x, wq, s, b)
    launch.gather(cuda_plan(6, 40, 256), x, wq[None], s[None], b[None], mx.zeros((6,), mx.uint32), 2)
    # The prefetch depths the sweeps try (bench.tune.SPLIT_DEPTHS), the grouped kernel's too.
    launch.dense(cuda_plan(5, 40, 256, warps=8, depth=3, row_tiles=2), x, wq, s, b)
    launch.gather(cuda_plan(6, 40, 256, warps=2, depth=3), x, wq[None], s[None], b[None],
                  mx.zeros((6,), mx.uint32), 2)
    dense = recorder.kernels[0]
    src = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n" + dense["header"]
    for i, k in enumerate(recorder.kernels):
        params = ", ".join(
            f"const {t}* {n}, const int* {n}_shape"
            for n, t in zip(k["input_names"], ["__nv_bfloat16", "uint32_t", "__nv_bfloat16", "__nv_bfloat16",
                                               "uint32_t"]))
        src += f"__global__ void k{i}({params}, __nv_bfloat16* y) {{\n{k['source']}\n}}\n"
    path = tmp_path / "check.cu"
    path.write_text(src)
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "check.cubin"),
                        str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
