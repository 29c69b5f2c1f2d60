#!/usr/bin/env python3
"""Where an overlapped step's time goes: the step with its parts left out, one at a time.

Run 11 (Llama-3-8B shape, k = 4): an overlapped step took 11.3 ms of device time, a
synchronous verify forward of the same 5 rows 7.4 ms. Each variant here is a chain of
STEPS dependent passes built lazily and then evaluated at once (ms a pass: the GPU's
time with MLX's dispatch of the ops, the host's graph building left out):

  decode            mlx-lm's KVCache, 1 row (plain decode's forward)
  verify            mlx-lm's KVCache, k+1 rows, "causal" mask, trimmed back after each
  device            DeviceKVCache (rows written at the device offset by a Scatter,
                    mx.put_along_axis), k+1 rows, offset fixed
  device-dynamic    the same, the rows written by mx.slice_update (MLX's
                    DynamicSliceUpdate), as before run 13
  step              the overlapped loop's whole step (verdict, drafter, offsets)
  step-dynamic      the same with the slice_update writes

All with additive masks. Runs 12a/12b/13 of benchmarks/h200/RUNS.md: bool against additive masks,
rows written at host-known slots (bf42ecf; not bit-exact on CUDA, since removed), keys and values
packed in one buffer (slower than the scatter, since removed).

Usage: python -m scripts.bench_step --model DIR [--k 4] [--context 300] [--patched] [--out DIR]
"""
import argparse
import json
import os
import statistics
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import trim_prompt_cache

from mtp_splitk import patch, plan
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.bench.measure import lazy_pipeline, warm_cache
from mtp_splitk.speculative import device_cache
from mtp_splitk.speculative.device_cache import DeviceKVCache

STEPS = 32


REPS = 7


def _timed(build, start, outputs=lambda x: x):
    """Median (host build ms, evaluation ms) a pass of a chain of STEPS
    passes; ``start()`` gives each chain its first input."""
    builds, evals = [], []
    for _ in range(REPS + 1):  # the first chain warms up
        x = start()
        tic = time.perf_counter()
        for _ in range(STEPS):
            x = build(x)
        built = time.perf_counter()
        mx.eval(outputs(x))
        done = time.perf_counter()
        builds.append((built - tic) / STEPS * 1e3)
        evals.append((done - built) / STEPS * 1e3)
    return statistics.median(builds[1:]), statistics.median(evals[1:])


class SliceKVCache(DeviceKVCache):
    """DeviceKVCache writing its rows with mx.slice_update at the offset array
    (MLX's DynamicSliceUpdate), as the loop did before run 13."""

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            return super().update_and_fetch(keys, values)
        self.keys = mx.slice_update(self.keys, keys, self.offset[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset[None], axes=(2,))
        return self.keys, self.values


def _swap(cache, kind):
    for c in cache:
        if type(c) is DeviceKVCache and kind == "dynamic":
            c.__class__ = SliceKVCache


def forward_chain(model, prompt, rows: int, cache_kind: str):
    cache = warm_cache(model, prompt.size)
    vocab = model.args.vocab_size
    if cache_kind != "plain":  # the offset stays: every pass writes the same positions
        device_cache.on_device(cache, prompt.size + rows, True)
        _swap(cache, cache_kind)

    def build(tokens):
        logits = model(tokens[None], cache=cache)
        if cache_kind == "plain":
            trim_prompt_cache(cache, rows)  # the rows go again at the same place
        return (mx.argmax(logits[0], axis=-1).astype(mx.uint32) + 1) % vocab

    first = prompt[-rows:].astype(mx.uint32)
    return _timed(build, lambda: first)


def step_chain(model, prompt, k: int, kind: str):
    """Each chain from the prompt again: its caches hold what the loop's would
    (the prompt and up to STEPS (k+1) rows, in 256-row buckets)."""
    vocab = model.args.vocab_size
    reference = [int(t) * 7 % vocab for t in prompt.tolist()]
    pipelines = []

    def start():
        if pipelines:
            pipelines.pop().close()
        drafter = AcceptanceControlledDrafter(reference, 0.8, vocab)
        pipeline, first = lazy_pipeline(model, prompt, drafter, k, STEPS)
        _swap(pipeline.cache, kind)  # step 0 was built on the scatter writes; the chain's steps not
        pipelines.append(pipeline)
        return first

    try:
        return _timed(lambda step: pipelines[-1].step(step), start,
                      lambda s: [s[0].token, s[0].accepted, s[2]])
    finally:
        pipelines.pop().close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an mlx-lm model directory")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--context", type=int, default=300, help="tokens in the cache first")
    parser.add_argument("--patched", action="store_true")
    parser.add_argument("--out", default=None, help="directory for bench_step.json")
    args = parser.parse_args()
    model, _ = load(args.model)
    if args.patched:
        patch.enable()
    prompt = mx.arange(args.context) % model.args.vocab_size
    rows = args.k + 1
    variants = {
        "decode": lambda: forward_chain(model, prompt, 1, "plain"),
        "verify": lambda: forward_chain(model, prompt, rows, "plain"),
        "device": lambda: forward_chain(model, prompt, rows, "scatter"),
        "device-dynamic": lambda: forward_chain(model, prompt, rows, "dynamic"),
        "step": lambda: step_chain(model, prompt, args.k, "scatter"),
        "step-dynamic": lambda: step_chain(model, prompt, args.k, "dynamic"),
    }
    results = {}
    print(f"{'variant':>16} {'host build ms':>14} {'evaluation ms':>14}")
    for name, fn in variants.items():
        build, evaluation = fn()
        results[name] = {"host_build_ms": build, "evaluation_ms": evaluation}
        print(f"{name:>16} {build:>14.2f} {evaluation:>14.2f}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"device": plan.current_device().name, "mlx": mx.__version__, "model": args.model,
                "patched": args.patched, "k": args.k, "context": args.context, "steps": STEPS}
        with open(os.path.join(args.out, "bench_step.json"), "w") as f:
            json.dump({"meta": meta, "variants": results}, f, indent=1)


if __name__ == "__main__":
    main()
