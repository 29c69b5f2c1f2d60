# Copyright © 2026 mtp_splitk contributors

"""The CUDA shim's harness (tests/cuda_shim/): kernel calls made through
``launch.*`` with mx.fast.cuda_kernel recorded instead of run, written out as
one C++ program of the bodies the generated kernels would hold, built with g++
and run on the CPU; their outputs read back, NaN where a kernel wrote nothing."""

import math
import os
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mtp_splitk.launch import cuda

SHIM_DIR = os.path.join(os.path.dirname(__file__), "cuda_shim")
SHIM_COMMON = os.path.join(os.path.dirname(__file__), "shim_common")
TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.uint32: "uint32_t",
         mx.uint8: "uint8_t"}
BITS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}

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
