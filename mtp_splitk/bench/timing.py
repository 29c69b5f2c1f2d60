# Copyright © 2026 mtp_splitk contributors

"""The timers of the benchmarks, one per method.

:func:`median_time`, for independent ops: one op's time is the wall time of
building and evaluating a batch of independent ops, divided by the batch,
median over repeats after warm-up: it includes MLX's per-op cost the way a
model's forward pays it. The copy bandwidth and the trivial-op floor are
measured the same way, in the same run.

:func:`median_call_us`, for dependent ops: the median time of one call, each
call its own measurement (a chain of ops, a forward pass).
"""

import statistics
import time

import mlx.core as mx


def median_time(build, reps=15, batch=32, warmup=3):
    """Median seconds per op of ``build(i)``, a lazy op on rotation slot i."""
    for _ in range(warmup):
        mx.eval([build(i) for i in range(batch)])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval([build(i) for i in range(batch)])
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def copy_bandwidth():
    """Bytes per second of a large elementwise copy (read + write)."""
    a = mx.random.uniform(shape=(128 * 2**20,)).astype(mx.bfloat16)  # 256 MB
    mx.eval(a)
    t = median_time(lambda i: a * 1.0, reps=10, batch=4)
    return 2 * a.nbytes / t


def trivial_op_floor():
    """Seconds per op of an add on 16 elements: MLX's fixed per-op cost."""
    s = mx.ones((16,))
    mx.eval(s)
    return median_time(lambda i: s + i, reps=20, batch=64)


def median_call_us(fn, reps=15, warmup=3, per=1):
    """Median µs of one ``fn()`` call (divided by ``per``, the ops it makes),
    after warm-up: for chains of dependent ops (scripts/bench_chain.py,
    scripts/bench_launch.py) and forward passes (:mod:`.measure`), where each
    call is its own measurement."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / per * 1e6
