#!/usr/bin/env python3
# Copyright © 2026 mtp_splitk contributors
"""mlx_lm.server under concurrent load, unpatched vs MTP_SPLITK=1: requests/s and tokens/s.

For each state the server is started on 127.0.0.1 (a free port), warmed up
with one burst, then sent ``--repeats`` bursts of ``--requests`` greedy
completion requests, ``--concurrency`` at a time (batched decode: M = 2..8
rows through every quantized matmul), and stopped. Reported per state: the
median burst's requests/s, generated tokens/s and mean latency; whether
every request completed, and the error lines of each server's log. Answers:
the share of prompts answered alike by every burst of a state (batches form
by arrival, and a row's kernel, so its rounding, depends on the batch's
size: the unpatched server need not reproduce itself either), and the
share the patched server answers as the unpatched one (median bursts),
with the mean shared prefix of the two answers.

Writes <out>/bench_serve.json. Usage:
  python -m scripts.bench_serve [--model DIR] [--requests 32] [--concurrency 8] [--out DIR]
Without --model: the synthetic Llama-3-8B shape (4-bit, random weights;
~4.5 GB, written once into the cache).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from mtp_splitk.bench import models, serve
from mtp_splitk.bench.harness import ByteProgress, device_meta


def measure(model, patched, args, logs):
    server = serve.start(model, Path(logs) / f"{'patched' if patched else 'mlx'}.log", patched)
    try:
        serve.wait_ready(server, args.timeout)
        prompts = [serve.PROMPTS[i % len(serve.PROMPTS)] + f" ({i})" for i in range(args.requests)]
        serve.burst(server, prompts[: args.concurrency], args.max_tokens, args.concurrency, args.timeout)
        bursts = [serve.burst(server, prompts, args.max_tokens, args.concurrency, args.timeout)
                  for _ in range(args.repeats)]
    finally:
        serve.stop(server)
    best = sorted(bursts, key=lambda b: b.summary()["tokens_per_s"])[len(bursts) // 2]
    result = best.summary()
    result["tokens_per_s_all"] = [b.summary()["tokens_per_s"] for b in bursts]
    result["log_problems"] = serve.problems(server.log_text())[:20]
    texts = [[a.text for a in b.answers] for b in bursts]
    result["answers_alike_in_every_burst"] = _share(list(zip(*texts)), lambda t: len(set(t)) == 1)
    return result, [a.text for a in best.answers]


def _share(items, keep) -> float:
    return sum(map(keep, items)) / max(len(items), 1)


def _shared_prefix(a, b) -> float:
    """How much of the longer answer the two share from the start (0..1)."""
    a, b = a or "", b or ""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: synthetic llama3-8b)")
    ap.add_argument("--requests", type=int, default=32, help="requests per burst (default: 32)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed bursts per state (default: 3)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request and start-up")
    ap.add_argument("--out", default=None, help="directory for bench_serve.json (default: none)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        root = models.default_root()
        models.check_disk(root, [("llama", "llama3-8b", False)])
        model = str(models.model_dir(root, "llama", "llama3-8b",
                                     progress=ByteProgress("writing llama llama3-8b")))
    doc = {"meta": dict(device_meta(), model=model, requests=args.requests,
                        concurrency=args.concurrency, max_tokens=args.max_tokens), "states": {}}
    texts = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as logs:
        for label, patched in (("mlx", False), ("patched", True)):
            doc["states"][label], texts[label] = measure(model, patched, args, logs)
            r = doc["states"][label]
            print(f"{label:8s} {r['completed']}/{r['requests']} done, {r['requests_per_s']:.2f} req/s, "
                  f"{r['tokens_per_s']:.1f} tok/s, latency {r['mean_latency_s']:.2f} s, "
                  f"log problems: {len(r['log_problems'])}", flush=True)
    doc["greedy_answers_equal"] = texts["mlx"] == texts["patched"]
    pairs = list(zip(texts["mlx"], texts["patched"]))
    doc["answers_equal_to_mlx"] = _share(pairs, lambda ab: ab[0] == ab[1])
    doc["shared_prefix_with_mlx"] = sum(_shared_prefix(*ab) for ab in pairs) / max(len(pairs), 1)
    doc["patched_over_mlx_tokens_per_s"] = (doc["states"]["patched"]["tokens_per_s"]
                                            / doc["states"]["mlx"]["tokens_per_s"])
    print(f"patched / mlx tokens/s: {doc['patched_over_mlx_tokens_per_s']:.2f}x; "
          f"answers equal to MLX's: {doc['answers_equal_to_mlx']:.0%} (shared prefix "
          f"{doc['shared_prefix_with_mlx']:.0%}; MLX alike in every burst: "
          f"{doc['states']['mlx']['answers_alike_in_every_burst']:.0%}) (mlx {mx.__version__})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_serve.json"), "w") as f:
            json.dump(doc, f, indent=1)
    ok = doc["greedy_answers_equal"] and all(
        s["completed"] == s["requests"] and not s["log_problems"] for s in doc["states"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
