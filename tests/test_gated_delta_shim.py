# Copyright © 2026 mtp_splitk contributors

"""kernels/gated_delta.cu compiled with g++ through a small CUDA shim
(tests/cuda_shim/) and run on the CPU, as launch.gated_delta builds its call
(the body mx.fast.cuda_kernel would wrap, its grid and outputs): against
mlx-lm's ops one row at a time, NaN-poisoned outputs, and rows and batches
computed independently bit for bit. It checks the kernel's C++ and algorithm,
not NVRTC or a GPU (tests/test_gated_delta_gpu.py does that on the device)."""

import math
import os
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mtp_splitk import launch
from mtp_splitk.launch import cuda
from _stand_ins import gated_delta_by_ops

SHIM_DIR = os.path.join(os.path.dirname(__file__), "cuda_shim")
SHIM_COMMON = os.path.join(os.path.dirname(__file__), "shim_common")
TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.uint32: "uint32_t",
         mx.uint8: "uint8_t"}
BITS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}

# (name, B, T, Hk, Hv, dk, dv, dtype)
CASES = [
    ("bf16_dk64", 1, 3, 2, 4, 64, 64, mx.bfloat16),
    ("bf16_two_batches", 2, 4, 1, 2, 128, 16, mx.bfloat16),
    ("f16_dk256_odd_heads", 1, 2, 1, 3, 256, 8, mx.float16),
    ("bf16_dk32_one_row", 3, 1, 2, 2, 32, 12, mx.bfloat16),
]


def inputs(B, T, Hk, Hv, dk, dv, dtype, seed):
    mx.random.seed(seed)
    q = (mx.random.normal((B, T, Hk, dk)) / math.sqrt(dk)).astype(dtype)
    k = (mx.random.normal((B, T, Hk, dk)) / math.sqrt(dk)).astype(dtype)
    v = mx.random.normal((B, T, Hv, dv)).astype(dtype)
    g = mx.exp(-mx.random.uniform(0.0, 1.0, (B, T, Hv)))
    beta = mx.sigmoid(mx.random.normal((B, T, Hv))).astype(dtype)
    state = mx.random.normal((B, Hv, dv, dk)) * 0.1
    return [q, k, v, g, beta, state]


class Recorder:
    """Stands in for mx.fast.cuda_kernel: keeps each kernel's text and each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, input_names, output_names, source, header="", **_):
        def call(inputs, grid, threadgroup, output_shapes, output_dtypes, init_value=None, **__):
            self.calls.append(dict(names=input_names, outputs=output_names, body=source, header=header,
                                   inputs=inputs, grid=grid, threadgroup=threadgroup,
                                   output_shapes=output_shapes, output_dtypes=output_dtypes))
            return [mx.full(s, math.nan, d) for s, d in zip(output_shapes, output_dtypes)]

        return call


def _dump(path, a):
    np.array(mx.contiguous(a).view(BITS[a.itemsize])).tofile(path)


def _load(path, shape, dtype):
    raw = np.fromfile(path, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32}[dtype.size])
    return mx.array(raw.reshape(shape)).view(dtype)


def _program(calls, workdir):
    """One C++ file: each recorded call's body in a function of the arguments the
    generated kernel has (inputs, their shapes, outputs), run through the shim."""
    parts = ['#include "cuda_shim.h"', calls[0]["header"], '#include <cstdlib>', '#include "shim_io.h"']
    runners = []
    for n, c in enumerate(calls):
        params, lines = [], [f"static void run_{n}(const std::string& dir) {{"]
        for i, (name, a) in enumerate(zip(c["names"], c["inputs"])):
            _dump(os.path.join(workdir, f"{n}_in{i}.bin"), a)
            params += [f"const {TYPES[a.dtype]}* {name}", f"const int* {name}_shape"]
            lines += [f'  auto in{i} = load<{TYPES[a.dtype]}>(dir + "/{n}_in{i}.bin");',
                      f"  static const int in{i}_shape[] = {{{', '.join(map(str, a.shape))}}};"]
        for i, (name, shape, d) in enumerate(zip(c["outputs"], c["output_shapes"], c["output_dtypes"])):
            _dump(os.path.join(workdir, f"{n}_out{i}.bin"), mx.full(shape, math.nan, d))
            params.append(f"{TYPES[d]}* {name}")
            lines.append(f'  auto out{i} = load<{TYPES[d]}>(dir + "/{n}_out{i}.bin");')
        parts.append(f"static void kernel_{n}({', '.join(params)}) {{\n  {c['body']}\n}}")
        args = [f"in{i}.data(), in{i}_shape" for i in range(len(c["inputs"]))]
        args += [f"out{i}.data()" for i in range(len(c["outputs"]))]
        threads = c["threadgroup"][0]
        call = f"kernel_{n}({', '.join(args)});"
        lines.append(f"  shim::launch({c['grid'][0] // threads}u, {threads}u, [&] {{ {call} }});")
        lines += [f'  save(dir + "/{n}_out{i}.bin", out{i});' for i in range(len(c["outputs"]))]
        runners.append("\n".join(lines + ["}"]))
    cases = "\n".join(f"    case {n}: run_{n}(dir); break;" for n in range(len(calls)))
    main = f"""int main(int argc, char** argv) {{
  const std::string dir = argv[1];
  for (int i = 2; i < argc; ++i) switch (std::atoi(argv[i])) {{
{cases}
    default: return 2;
  }}
  return 0;
}}"""
    return "\n".join(parts + runners + [main]) + "\n"


def emulate(launches, workdir, name):
    """The kernel calls ``launches()`` makes (through launch.*, with
    mx.fast.cuda_kernel recorded, not run) built with g++ on the shim and run:
    each call's outputs, NaN where unwritten."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the CUDA kernel cannot be compiled through the C++ shim")
    recorder = Recorder()
    original = mx.fast.cuda_kernel
    caches = (cuda.gated_delta_launch, cuda.dense_launch, cuda.gather_launch, cuda.multi_launch)
    mx.fast.cuda_kernel = recorder
    for cache in caches:
        cache.cache_clear()
    try:
        launches()
    finally:
        mx.fast.cuda_kernel = original
        for cache in caches:
            cache.cache_clear()
    src, exe = os.path.join(workdir, f"{name}.cpp"), os.path.join(workdir, name)
    with open(src, "w") as f:
        f.write(_program(recorder.calls, workdir))
    cmd = [gxx, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-I", SHIM_DIR, "-I", SHIM_COMMON,
           src, "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0 and "warning" not in build.stderr, build.stderr[-6000:]
    run = subprocess.run([exe, workdir, *map(str, range(len(recorder.calls)))], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    return [[_load(os.path.join(workdir, f"{n}_out{i}.bin"), s, d)
             for i, (s, d) in enumerate(zip(c["output_shapes"], c["output_dtypes"]))]
            for n, c in enumerate(recorder.calls)]


def _emulate(requests, workdir):
    """Each request (the arguments of launch.gated_delta) through the g++-built kernel."""
    def launches():
        for args, all_states in requests:
            launch.gated_delta(*args, all_states=all_states)

    return emulate(launches, workdir, "gated_delta")


def _rel(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """Every case with all its states and with the last only; then the two-batch
    case's first row alone and its first batch alone."""
    requests, index = [], {}
    for n, (name, *shape) in enumerate(CASES):
        args = inputs(*shape, seed=n)
        index[name] = (args, len(requests))
        requests += [(args, True), (args, False)]
    args, _ = index["bf16_two_batches"]
    q, k, v, g, beta, state = args
    # Row 0 alone, and batch 0 alone: each must be the whole call's, bit for bit.
    requests.append(([q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], state], False))
    requests.append(([a[:1] for a in args], True))
    return index, requests, _emulate(requests, str(tmp_path_factory.mktemp("gated_delta")))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_emulated_kernel_matches_mlx_lms_ops(emulated, name):
    index, _, outputs = emulated
    args, at = index[name]
    (y, states), (y_last, last) = outputs[at], outputs[at + 1]
    for out in (y, states, y_last, last):
        assert not np.isnan(np.array(out.astype(mx.float32))).any(), "unwritten (NaN-poisoned) outputs"
    y_ref, states_ref = gated_delta_by_ops(*args)
    assert _rel(states, states_ref) < 1e-5  # float32: the sums' order only
    assert _rel(y, y_ref) < (1e-2 if args[0].dtype == mx.bfloat16 else 3e-3)
    assert mx.array_equal(y_last, y) and mx.array_equal(last[0], states[-1])


def test_emulated_rows_and_batches_are_independent(emulated):
    index, requests, outputs = emulated
    _, at = index["bf16_two_batches"]
    y, states = outputs[at]
    y_row0, s_row0 = outputs[-2]
    assert mx.array_equal(y_row0, y[:, :1]) and mx.array_equal(s_row0[0], states[0])
    y_b0, states_b0 = outputs[-1]
    assert mx.array_equal(y_b0, y[:1]) and mx.array_equal(states_b0, states[:, :1])
