#!/usr/bin/env python3
"""Count the ops of a decode step, a synchronous verify pass and an overlapped step.

On MLX's CUDA backend every op costs ~6-9 µs whatever its size, so at Llama-3-8B's
shape a step's time is mostly its op count. This builds each step lazily (after the
one before it is evaluated, so only its own ops are in the graph), writes the graph
with ``mx.export_to_dot`` and counts its nodes by primitive. Views (reshape,
broadcast, ...) are counted apart: they launch nothing. Graph building only:
nothing is timed, so the counts are the same on a loaded machine. On the CPU the
kernels' fallbacks and MLX's attention decomposition are counted instead of the
GPU's primitives: run it on the GPU for the GPU's numbers.

Usage: python -m scripts.count_ops --model DIR [--k 4] [--context 300] [--patched] [--out DIR]
"""
import argparse
import collections
import json
import os
import re
import tempfile

import mlx.core as mx
from mlx_lm import load

from mtp_splitk import patch, plan
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.bench.measure import lazy_pipeline, warm_cache

# Primitives that make a view or nothing on the GPU (no kernel launch).
VIEWS = {"Reshape", "Broadcast", "Squeeze", "ExpandDims", "Transpose", "Slice", "AsStrided",
         "StopGradient", "Depends", "Split", "Flatten", "Unflatten"}


def census(*outputs):
    """{primitive: count} of the unevaluated graph behind ``outputs``."""
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        text = open(f.name).read()
    return dict(collections.Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', text)))


def summary(counts):
    kernels = {p: n for p, n in counts.items() if p not in VIEWS}
    return {"launching": sum(kernels.values()), "views": sum(counts.values()) - sum(kernels.values()),
            "by_primitive": dict(sorted(kernels.items(), key=lambda kv: -kv[1]))}


def _state(cache):
    return [a for c in cache for a in c.state if isinstance(a, mx.array)]


def count(model, k: int, context: int):
    vocab = getattr(model, "language_model", model).args.vocab_size
    prompt = mx.arange(context + 1) % vocab
    mx.eval(prompt)  # the steps' own ops only
    out = {}

    cache = warm_cache(model, context)
    logits = model(prompt[None, -1:], cache=cache)[:, -1, :]  # mlx-lm's generate_step
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    out["decode"] = summary(census(mx.argmax(logprobs, axis=-1), logprobs, *_state(cache)))

    cache = warm_cache(model, context)
    verify = model(prompt[None, -(k + 1):], cache=cache)
    out[f"verify M={k + 1}"] = summary(census(verify, *_state(cache)))

    reference = [int(t) for t in (prompt * 7 % vocab).tolist()]
    drafter = AcceptanceControlledDrafter(reference, 0.8, vocab)
    pipeline, current = lazy_pipeline(model, prompt, drafter, k, 1)
    mx.eval(current[0].accepted, _state(pipeline.cache))
    verdict, logprobs, drafts, _ = pipeline.step(current)
    out[f"overlapped step k={k}"] = summary(
        census(verdict.inputs, verdict.accepted, verdict.token, drafts, *_state(pipeline.cache))
    )
    pipeline.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an mlx-lm model directory")
    parser.add_argument("--k", type=int, default=4, help="drafts a step (verify rows: k + 1)")
    parser.add_argument("--context", type=int, default=300, help="tokens in the cache before the step")
    parser.add_argument("--patched", action="store_true", help="with the plugin's patch on")
    parser.add_argument("--out", default=None, help="directory for count_ops.json")
    args = parser.parse_args()
    model, _ = load(args.model)
    if args.patched:
        patch.enable()
    result = count(model, args.k, args.context)
    for name, s in result.items():
        top = ", ".join(f"{p} {n}" for p, n in list(s["by_primitive"].items())[:12])
        print(f"{name:>22}: {s['launching']:4d} ops ({s['views']} views)  {top}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"device": plan.current_device().name, "mlx": mx.__version__, "model": args.model,
                "patched": args.patched, "k": args.k, "context": args.context}
        with open(os.path.join(args.out, "count_ops.json"), "w") as f:
            json.dump({"meta": meta, "steps": result}, f, indent=1)


if __name__ == "__main__":
    main()
