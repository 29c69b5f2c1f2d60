#!/usr/bin/env python3
"""Host (Python + graph-building) cost of one patched quantized matmul call.

A model forward makes a few hundred quantized matmul calls per token; in
mlx-lm's pipelined decode the host builds the next step's graph while the GPU
runs this one, so host µs per call add up to ms per token when the host is
the bottleneck. This measures, on any machine (the CPU build too), one
`QuantizedLinear` call unpatched and patched, with the planner told it is on
a CUDA device (the given tuning table) and the kernel launch replaced by a
stub that builds one MLX op (the real launch, `mx.fast.cuda_kernel`, costs
more). Nothing is evaluated. Unpatched and patched blocks alternate, so that
load from other processes falls on both alike; the difference is the median
of the paired blocks.

With ``--model DIR`` it times a whole forward of M rows (``--rows``) instead:
host ms to build it unpatched and patched, every kernel launch (dense, fused
q/k/v, fused gate/up, grouped MoE, grouped gate/up) a stub, and the launches a
forward makes. (Run 13, RUNS.md: real-shape synthetic models written with two
layers, ``synthetic.SIZES[size][1]["num_hidden_layers"] = 2`` before
``synthetic.write_model``.)

With ``--model DIR --step K`` it times the overlapped loop's step instead (k = K
drafts, the acceptance-controlled drafter): host ms to build one, as a chain of
32 steps built lazily (bench.measure.step_split_ms's build), uncompiled and with
the target's part through ``mx.compile`` (``compile_step``), unpatched and patched.

With ``--model DIR --on-device`` (on a GPU) nothing is stubbed and the planner sees the
real device: host ms to build a chain of forwards and ms to evaluate it, unpatched and
patched; ``--profile N`` prints the N functions of most own time in one block of each
(cProfile), to find host work that only the real device's path does.

Usage: python -m scripts.bench_host [--device-name "NVIDIA H200"] [--calls 2000] [--blocks 41]
       python -m scripts.bench_host --model DIR [--rows 5] [--step 4] [--on-device [--profile 25]]
"""
import argparse
import collections
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from mtp_splitk import launch, patch, plan

# (N, K, M): the H200 table sends 4096x4096 to MLX at M = 1 and to the kernel
# at M = 5, 2048x768 to MLX at both, the 128256-row LM head to the kernel.
ROWS = [(4096, 4096, 1), (4096, 4096, 5), (2048, 768, 1), (2048, 768, 5), (128256, 4096, 1)]


def block_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def layer(N, K):
    q = nn.QuantizedLinear(K, N, bias=False)
    half = {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in q.parameters().items()}
    q.update(half)
    mx.eval(q.parameters())
    return q.eval()  # as mlx_lm.load returns a model: no derivatives' wrapper round a kernel call


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device-name", default="NVIDIA H200", help="whose tuning table the planner reads"
    )
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed block")
    ap.add_argument("--blocks", type=int, default=41, help="timed blocks per variant")
    ap.add_argument("--model", help="time a whole forward of this mlx-lm model directory instead")
    ap.add_argument("--rows", type=int, default=5, help="with --model: rows of the forward")
    ap.add_argument("--step", type=int, metavar="K", help="with --model: the overlapped loop's step of K drafts")
    ap.add_argument("--on-device", action="store_true", help="with --model: the real device and launches")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="with --on-device: cProfile's top N")
    args = ap.parse_args()
    if args.on_device:
        return device_forward_ms(args.model, args.rows, args.profile)
    device = plan.Device("cuda", args.device_name, 132)
    plan.current_device = lambda: device  # the planner believes it is on that GPU
    assert plan.load_tuning(device.name), f"no tuning table for {device.name}"
    if args.model:
        return forward_host_ms(args.model, args.rows, device, step=args.step)
    launches = []

    def stub(p, x, w, scales, biases, poison=None):
        launches.append(1)
        return mx.zeros((x.shape[0], p.N), x.dtype)  # one MLX op, like the real launch

    launch.dense = stub
    print(
        f"host µs per QuantizedLinear call (median of {args.blocks} alternating blocks of "
        f"{args.calls} calls), planner on {device.name}'s table"
    )
    print("| layer (N×K) | M | unpatched | patched | patched − unpatched | patched path |")
    print("|---|---|---|---|---|---|")
    for N, K, M in ROWS:
        q = layer(N, K)
        x = mx.zeros((1, M, K), mx.bfloat16)
        base, patched = [], []
        with patch.enabled():
            q(x)  # the first call decides the route
        for _ in range(args.blocks):
            base.append(block_us(lambda: q(x), args.calls))
            with patch.enabled():
                launches.clear()
                patched.append(block_us(lambda: q(x), args.calls))
        path = "split-K (stub launch)" if launches else "MLX's op"
        diff = statistics.median(p - b for p, b in zip(patched, base))
        print(
            f"| {N}×{K} | {M} | {statistics.median(base):.2f} | {statistics.median(patched):.2f} "
            f"| {diff:+.2f} | {path} |"
        )


def forward_host_ms(model_dir: str, rows: int, device, forwards: int = 20, blocks: int = 7, step=None):
    """Host ms to build one forward of ``rows`` rows (or one overlapped step of
    ``step`` drafts: :func:`step_host_ms`), unpatched and patched (alternating
    blocks; median), every launch a stub of one MLX op."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    counts = collections.Counter()

    def stub(kind, shape):
        def launch_stub(p, x, *rest, poison=None):
            counts[kind] += 1
            return shape(p, x, *rest)

        return launch_stub

    launch.dense = stub("dense", lambda p, x, *r: mx.zeros((x.shape[0], p.N), x.dtype))
    launch.dense_multi = stub("multi", lambda p, x, w: [mx.zeros((x.shape[0], m.N), x.dtype) for m in p.members])
    launch.dense_glu = stub("glu", lambda p, x, *r: mx.zeros((x.shape[0], p.members[0].N), x.dtype))
    launch.dense_residual = stub("residual", lambda p, x, *r: mx.zeros((x.shape[0], p.N), x.dtype))
    launch.gather = stub("gather", lambda p, x, w, s, b, idx, x_div: mx.zeros((idx.size, p.N), x.dtype))
    launch.gather_glu = stub("gather_glu", lambda p, x, g, u, idx, x_div: mx.zeros((idx.size, p.N), x.dtype))
    model, _ = load(model_dir)
    if step is not None:
        return step_host_ms(model, step, device, blocks)
    x = mx.array([[3] * rows])

    def build_ms():
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        for _ in range(forwards):
            model(x, cache=cache)
        return (time.perf_counter() - t0) / forwards * 1e3

    with patch.enabled():
        build_ms()  # the first calls decide the routes
    base, patched = [], []
    for _ in range(blocks):
        base.append(build_ms())
        with patch.enabled():
            counts.clear()
            patched.append(build_ms())
    per_forward = {kind: n // forwards for kind, n in counts.items()}
    print(f"host ms to build a forward of {rows} rows ({model_dir}), planner on {device.name}'s table: "
          f"unpatched {statistics.median(base):.3f}, patched {statistics.median(patched):.3f}; "
          f"stub launches a forward: {per_forward}")


def device_forward_ms(model_dir: str, rows: int, top: int, forwards: int = 32, blocks: int = 7):
    """Host ms to build a chain of ``forwards`` dependent forwards of ``rows`` rows and ms
    to evaluate it, on the real device, unpatched and patched (alternating blocks; median)."""
    import cProfile
    import pstats

    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(model_dir)
    vocab = model.args.vocab_size

    def chain_ms(profile=None):
        cache = make_prompt_cache(model)
        x = mx.array([[3] * rows])
        if profile:  # the build only
            profile.enable()
        t0 = time.perf_counter()
        for _ in range(forwards):
            x = (mx.argmax(model(x, cache=cache), axis=-1) + 1) % vocab
        t1 = time.perf_counter()
        if profile:
            profile.disable()
        mx.eval(x)
        return (t1 - t0) / forwards * 1e3, (time.perf_counter() - t1) / forwards * 1e3

    times = {False: [], True: []}
    for i in range(blocks + 1):  # the first block warms up (routes, kernels)
        for patched in times:
            with patch.enabled(patched):
                build, evaluate = chain_ms()
            if i:
                times[patched].append((build, evaluate))
    for patched, runs in times.items():
        print(f"{'patched' if patched else 'unpatched'}, {forwards} forwards of {rows} rows on "
              f"{plan.current_device().name}: build {statistics.median(b for b, _ in runs):.3f} ms, "
              f"evaluation {statistics.median(e for _, e in runs):.3f} ms a forward")
    for patched in times if top else ():
        profile = cProfile.Profile()
        with patch.enabled(patched):
            chain_ms(profile)
        print(f"--- {'patched' if patched else 'unpatched'}: own time, top {top}")
        pstats.Stats(profile).sort_stats("tottime").print_stats(top)


def step_host_ms(model, k: int, device, blocks: int, steps: int = 32):
    from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
    from mtp_splitk.bench.measure import step_split_ms

    prompt = mx.array(list(range(3, 40)), mx.uint32)

    def build_ms(compile_step):
        drafter = AcceptanceControlledDrafter(list(range(4 * steps * (k + 1))), 0.8, model.args.vocab_size, seed=k)
        return step_split_ms(model, prompt, drafter, k, steps, compile_step)["host_build_ms"]

    for patched in (False, True):
        with patch.enabled(patched):
            times = {c: [] for c in (False, True)}
            for _ in range(blocks):
                for c in times:
                    times[c].append(build_ms(c))
        print(f"host ms to build an overlapped step (k = {k}, median of {blocks} chains of {steps}), "
              f"{'patched, planner on ' + device.name + chr(39) + 's table' if patched else 'unpatched'}: "
              f"uncompiled {statistics.median(times[False]):.3f}, compiled {statistics.median(times[True]):.3f}")


if __name__ == "__main__":
    main()
