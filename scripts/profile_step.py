#!/usr/bin/env python3
"""One step's kernels under Nsight Compute: a decode step, a synchronous verify pass or an overlapped step.

The step is warmed up, then STEPS more are run between cuProfilerStart / cuProfilerStop, each
evaluated on its own, so ncu (started with --profile-from-start off) sees only their kernels:

  ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \\
      --log-file step.csv python -m scripts.profile_step --model DIR --what step [--patched]
  python -m scripts.profile_step --summarize step.csv [--steps 2]

The summary: kernels a step, their GPU time a step, and the kernels that take it, by name.
Each kind of step runs in its own process (ncu cannot tell them apart inside one). ncu runs
the kernels one at a time; with --cache-control none it leaves the L2 as the kernel before
left it (run 13a's profiles flushed it before every kernel: an upper bound).
"""
import argparse
import collections
import csv
import ctypes
import sys

STEPS = 2
WARMUP = 6


def _profiler(on: bool):
    cuda = ctypes.CDLL("libcuda.so.1")
    status = cuda.cuProfilerStart() if on else cuda.cuProfilerStop()
    if status != 0:
        raise RuntimeError(f"cuProfiler{'Start' if on else 'Stop'} returned {status}")


def run(model_dir: str, what: str, patched: bool, k: int, context: int):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import trim_prompt_cache

    from mtp_splitk import patch
    from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
    from mtp_splitk.bench.measure import lazy_pipeline, warm_cache

    model, _ = load(model_dir)
    if patched:
        patch.enable()
    vocab = model.args.vocab_size
    prompt = mx.arange(context) % vocab
    if what == "step":
        drafter = AcceptanceControlledDrafter([int(t) * 7 % vocab for t in prompt.tolist()], 0.8, vocab)
        pipeline, current = lazy_pipeline(model, prompt, drafter, k, WARMUP + STEPS)
        state = {"current": current}

        def one():
            state["current"] = pipeline.step(state["current"])
            verdict, _, drafts, _ = state["current"]
            mx.eval(verdict.token, verdict.accepted, drafts)
    else:
        rows = 1 if what == "decode" else k + 1
        cache = warm_cache(model, context)
        tokens = prompt[-rows:]

        def one():
            logits = model(tokens[None], cache=cache)
            mx.eval(mx.argmax(logits[0], axis=-1), [c.state for c in cache])
            trim_prompt_cache(cache, rows)

    for _ in range(WARMUP):
        one()
    mx.synchronize()
    _profiler(True)
    for _ in range(STEPS):
        one()
    mx.synchronize()
    _profiler(False)


def summarize(path: str, steps: int):
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    times = collections.defaultdict(float)
    counts = collections.Counter()
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r["Metric Unit"]]
        name = r["Kernel Name"].split("(")[0][:70]
        times[name] += float(r["Metric Value"].replace(",", "")) * scale
        counts[name] += 1
    total = sum(times.values())
    print(f"{sum(counts.values()) / steps:.0f} kernels a step, {total / steps / 1e3:.2f} ms of GPU time a step")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {t / steps:9.1f} µs  {counts[name] / steps:5.0f}×  {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an mlx-lm model directory")
    ap.add_argument("--what", choices=("decode", "verify", "step"), default="step")
    ap.add_argument("--patched", action="store_true")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--summarize", metavar="CSV", help="summarize an ncu --csv log instead")
    ap.add_argument("--steps", type=int, default=STEPS, help="with --summarize: steps profiled")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, args.steps)
    elif not args.model:
        ap.error("--model is required")
    else:
        run(args.model, args.what, args.patched, args.k, args.context)


if __name__ == "__main__":
    sys.exit(main())
