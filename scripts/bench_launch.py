#!/usr/bin/env python3
"""Where a custom kernel's per-op cost goes on MLX's CUDA backend.

bench_chain.py showed our split-K op costing ~15 us of host time to build
(MLX's quantized_matmul: ~1.6) and ~50 us per op in a dependent chain where
the kernel itself runs ~24 (ncu). This separates the parts with kernels that
do almost nothing, so that only overhead is left, per op, in chains of 64
dependent ops on a 1 x 256 bfloat16 row:
  mlx_add      x + 1: MLX's own op floor;
  mlx_qmm      mx.quantized_matmul, 256 x 256 4-bit: MLX's matmul floor;
  tiny         a custom kernel copying x, 3-line source, no template;
  tiny_tmpl    the same with our 10 template arguments;
  big_header   the same with our kernel file as its header (source size);
  include      the same with only an #include of our kernel file by absolute
               path as its header (does NVRTC read it? does build get cheap?);
  ours         our split-K op at 256 x 256 (launch.dense, a fixed plan).
Columns: build (graph construction only) and chain (build + evaluate + wait),
us per op, medians.
Usage: python -m scripts.bench_launch [--out DIR]
"""
import argparse
import json
import os
import sys

import mlx.core as mx

from mtp_splitk import launch, plan as planner
from mtp_splitk.bench.timing import median_call_us
from mtp_splitk.launch import common

LENGTH = 64
D = 256
COPY = """
const int i = threadIdx.x + blockIdx.x * blockDim.x;
if (i < x_shape[1]) y[i] = x[i];
"""


def custom(name, header="", template=None):
    kernel = mx.fast.cuda_kernel(name=name, input_names=["x"], output_names=["y"], source=COPY, header=header)

    def op(x):
        return kernel(inputs=[x], template=template, grid=(D, 1, 1), threadgroup=(D, 1, 1),
                      output_shapes=[x.shape], output_dtypes=[x.dtype])[0]

    return op


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not mx.cuda.is_available():
        sys.exit("bench_launch.py needs MLX's CUDA backend.")
    mx.random.seed(0)
    x = mx.random.normal((1, D)).astype(mx.bfloat16)
    w, s, b = mx.quantize(mx.random.normal((D, D)).astype(mx.bfloat16) * 0.02, 64, 4)
    mx.eval(x, w, s, b)
    plan = planner.Plan("cuda", "affine", 4, 64, D, D, 2, 1, 1, 1)
    template = common.template(plan, mx.bfloat16, mx.bfloat16)
    ops = {
        "mlx_add": lambda v: v + 1,
        "mlx_qmm": lambda v: mx.quantized_matmul(v, w, s, b, True, 64, 4),
        "tiny": custom("bench_tiny"),
        "tiny_tmpl": custom("bench_tiny_tmpl", template=template),
        "big_header": custom("bench_big_header", header=launch.read_source("splitk_qmm.cu")),
        "include": custom("bench_include", header=f'#include "{common.kernel_dir()}/splitk_qmm.cu"\n'),
        "ours": lambda v: launch.dense(plan, v, w, s, b),
    }
    rows = []
    for name, op in ops.items():
        def chain():
            v = x
            for _ in range(LENGTH):
                v = op(v)
            return v

        try:
            row = {"op": name, "build": median_call_us(chain, reps=21, per=LENGTH),
                   "chain": median_call_us(lambda: mx.eval(chain()), reps=21, per=LENGTH)}
        except Exception as e:  # the include variant may not compile
            print(f"{name:12s} failed: {str(e)[:300]}", flush=True)
            rows.append({"op": name, "error": str(e)[:2000]})
            continue
        rows.append(row)
        print(f"{name:12s} build {row['build']:6.1f} us/op   chain {row['chain']:6.1f} us/op", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_launch.json"), "w") as f:
            json.dump(dict(device=planner.current_device().name, mlx=mx.__version__, length=LENGTH, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
