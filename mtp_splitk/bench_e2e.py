# Copyright © 2026 mtp_splitk contributors

"""End-to-end tokens/s: plain and speculative decoding, with and without the patch.

What is measured, per model (synthetic, real shapes, random 4-bit weights,
loaded by ``mlx_lm.load``):

- ``plain``: mlx-lm's own ``generate_step`` (pipelined), unpatched and patched;
- ``acceptance``: the speculative loop with the acceptance-controlled
  drafter (the target's recorded greedy continuation, each token proposed
  with probability p, another token otherwise) for every (p, k), unpatched
  and patched: the system at a known acceptance rate, whatever the random
  weights make of the text. The continuation is recorded on the verify
  path (the loop itself at p = 1, same k; see ``reference`` below), and
  each run says whether it reproduced it;
- ``draft``: the speculative loop with a real draft model (a smaller
  synthetic model of the same family and vocabulary);
- ``mtp``: the speculative loop with an MTP head (a model with one);
- ``verify``: the latency of one synchronous target forward of M rows on a
  warm cache (the verify step), M = 1..17, unpatched and patched;
- ``breakdown``: where a forward's time goes (attention, MLP or MoE, LM head,
  the rest), per component, at M = 1 and M = k + 1.

Generation tokens/s leaves the prompt out: tokens after the first step over
the time from the first step's tokens to the last token, median over
``repeats``. Prompt processing is reported separately. Results are written
(and rewritten as they come in, so a time-boxed run keeps what it measured)
to ``<out>/bench_e2e.json`` and ``<out>/bench_e2e.md``.
"""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from . import patch, plan, synthetic

# name: (family, size, draft family, draft size); the drafts share their
# target's vocabulary.
MODELS = {
    "llama3-8b": ("llama", "llama3-8b", "llama", "llama3.2-1b"),
    "qwen3-30b-a3b": ("qwen3_moe", "qwen3-30b-a3b", "qwen3", "qwen3-0.6b"),
}
# An MTP model that fits the run: DeepSeek-V3's layout (MLA attention, MoE,
# one MTP block) at the "small" size, since its real shape (671B) does not.
MTP_MODEL = ("deepseek_v3", "small")
ACCEPTANCES = (0.6, 0.8, 0.9)
DRAFT_TOKENS = (2, 4, 6)
VERIFY_MS = tuple(range(1, 18))
PROMPT = "Speculative decoding drafts a few tokens with a cheap model and verifies them"


class Deadline:
    """Skips work once ``seconds`` have passed (a time-boxed GPU session)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


# -- models ---------------------------------------------------------------------------------


def model_dir(root: Path, family: str, size: str, mtp: bool = False, progress=None) -> Path:
    """A synthetic model directory under ``root``, written once."""
    name = f"{family}-{size}{'-mtp' if mtp else ''}-v{synthetic.FORMAT_VERSION}"
    path = Path(root) / name
    if (path / "config.json").exists():
        return path
    partial = path.with_name(name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    if mtp:
        from .mtp.synthetic import write_mtp_model

        write_mtp_model(partial, family, size)
    else:
        synthetic.write_model(partial, family, size, progress=progress)
    partial.rename(path)
    return path


def model_specs() -> List[Tuple[str, str, bool]]:
    """(family, size, with MTP head) of every directory a full run reads."""
    specs = []
    for family, size, draft_family, draft_size in MODELS.values():
        specs += [(family, size, False), (draft_family, draft_size, False)]
    return specs + [(*MTP_MODEL, True)]


def prompt_tokens(tokenizer) -> mx.array:
    return mx.array(tokenizer.encode(PROMPT))


# -- measurements ---------------------------------------------------------------------------


def _tokens_per_second(times: List[float], first_burst: int) -> float:
    """Tokens after the first step over the time they took."""
    n = len(times) - first_burst
    span = times[-1] - times[first_burst - 1]
    return n / span if n > 0 and span > 0 else 0.0


def plain_decode(model, prompt: mx.array, max_tokens: int) -> Dict:
    """mlx-lm's own generate_step (asynchronously pipelined decode)."""
    from mlx_lm.generate import generate_step

    tic = time.perf_counter()
    times, tokens = [], []
    for token, _ in generate_step(prompt, model, max_tokens=max_tokens):
        times.append(time.perf_counter())
        tokens.append(int(token))
    return {
        "tps": _tokens_per_second(times, 1),
        "prompt_tps": prompt.size / (times[0] - tic),
        "tokens": tokens,
    }


def speculative_decode(model, prompt: mx.array, drafter, k: int, max_tokens: int, submit_every: int = 0) -> Dict:
    from .speculative import Stats, speculative_generate_step

    stats = Stats()
    times, tokens = [], []
    steps = speculative_generate_step(
        prompt, model, drafter, num_draft_tokens=k, max_tokens=max_tokens, stats=stats, submit_every=submit_every
    )
    for token, _, _ in steps:
        times.append(time.perf_counter())
        tokens.append(int(token))
    first_burst = stats.accepted_per_step[0] + 1 if stats.steps else 1
    return {
        "tps": _tokens_per_second(times, first_burst),
        "prompt_tps": stats.prompt_tps,
        "steps": stats.steps,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": stats.acceptance_rate,
        "per_token_acceptance": stats.per_token_acceptance,
        "tokens_per_step": stats.tokens_per_step,
        "verify_ms": 1e3 * stats.mean_verify_time,
        "tokens": tokens,
    }


def median_run(run: Callable[[], Dict], repeats: int, warmup: bool = True) -> Dict:
    """The run whose tokens/s is the median of ``repeats``, after one
    warm-up run (first use of a variant compiles its kernels)."""
    if warmup:
        run()
    results = sorted((run() for _ in range(max(1, repeats))), key=lambda r: r["tps"])
    best = dict(results[len(results) // 2])
    best["tps_all"] = [r["tps"] for r in results]
    return best


def verify_latency(model, Ms, context: int, reps: int) -> Dict[int, float]:
    """Median ms of one synchronous forward of M rows after ``context`` tokens,
    the cache trimmed back after each call (the verify step's shape)."""
    cache = _warm_cache(model, context)
    return {M: _time(lambda: _forward_trim(model, cache, M), reps) for M in Ms}


def _time(fn, reps: int) -> float:
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def breakdown(model, M: int, context: int, reps: int) -> Dict[str, float]:
    """ms per forward of M rows spent in each part, each timed alone
    (synchronously, as many calls as the model makes) and scaled by the
    number of layers: attention (projections, RoPE, SDPA, norms), MLP or
    MoE block, the LM head, and the whole forward for comparison."""
    from mlx_lm.models.cache import trim_prompt_cache

    layers = model.layers
    layer = layers[len(layers) // 2]  # a MoE layer where a model mixes dense ones
    dim = model.args.hidden_size
    cache = _warm_cache(model, context)
    x = (mx.random.normal((1, M, dim)) * 0.5).astype(mx.bfloat16)
    mx.eval(x)
    c = cache[len(layers) // 2]
    mask = "causal" if M > 1 else None

    def attention():
        out = layer.self_attn(layer.input_layernorm(x), mask=mask, cache=c)
        trim_prompt_cache([c], M)
        return out

    mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    norm = model.model.norm
    whole = _time(lambda: _forward_trim(model, cache, M), reps)
    parts = {
        "attention": len(layers) * _time(attention, reps),
        "mlp": len(layers) * _time(lambda: mlp(layer.post_attention_layernorm(x)), reps),
        "lm_head": _time(lambda: head(norm(x)), reps),
    }
    parts["forward"] = whole
    parts["rest"] = whole - sum(v for k, v in parts.items() if k != "forward")
    return parts


def _warm_cache(model, context: int):
    """A prompt cache holding ``context`` tokens."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.arange(context)[None] % model.args.vocab_size, cache=cache))
    return cache


def _forward_trim(model, cache, M: int):
    """One forward of M rows on ``cache``, evaluated, then trimmed back off it."""
    from mlx_lm.models.cache import trim_prompt_cache

    out = model((mx.arange(M)[None] * 5 + 1) % model.args.vocab_size, cache=cache)
    mx.eval(out)
    trim_prompt_cache(cache, M)
    return out


def matmul_census(model, M: int) -> Dict[str, int]:
    """Where the quantized matmuls of one forward of M rows go: the split-K
    kernels or MLX's ops (counted in an untimed call)."""
    from mlx_lm.models.cache import make_prompt_cache

    from . import launch, ops

    counts = {"splitk": 0, "mlx": 0}
    real = launch.dense, launch.gather, ops.mx

    def counting(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    launch.dense, launch.gather = counting(real[0], "splitk"), counting(real[1], "splitk")
    ops.mx = _CountingMx(counts)  # ops reaches MLX's ops through this name
    try:
        mx.eval(model(mx.arange(M)[None], cache=make_prompt_cache(model)))
    finally:
        launch.dense, launch.gather, ops.mx = real
    return counts


class _CountingMx:
    """mlx.core, with quantized_matmul / gather_qmm counted."""

    def __init__(self, counts):
        self._counts = counts

    def __getattr__(self, name):
        attr = getattr(mx, name)
        if name in ("quantized_matmul", "gather_qmm"):

            def counted(*args, **kwargs):
                self._counts["mlx"] += 1
                return attr(*args, **kwargs)

            return counted
        return attr


# -- the run --------------------------------------------------------------------------------


class Results:
    """A benchmark's JSON document and its markdown (``render``, by default
    this module's), rewritten after every measurement as <out>/<name>.json
    and .md; with ``write=False`` (ranks other than 0) it stays in memory."""

    def __init__(self, out: Path, meta: Dict, name: str = "bench_e2e", render=None, write: bool = True):
        self.out = Path(out)
        self.name = name
        self.render = render or markdown
        self.write = write
        self.doc = {"meta": meta, "models": {}}
        if write:
            self.out.mkdir(parents=True, exist_ok=True)

    def put(self, model: str, section: str, key, value) -> None:
        value = json.loads(json.dumps(value))  # as it will read back (string keys)
        self.doc["models"].setdefault(model, {}).setdefault(section, {})[str(key)] = value
        self.save()

    def save(self) -> None:
        if not self.write:
            return
        with open(self.out / f"{self.name}.json", "w") as f:
            json.dump(self.doc, f, indent=1)
        with open(self.out / f"{self.name}.md", "w") as f:
            f.write(self.render(self.doc))


def _strip(result: Dict) -> Dict:
    return {k: v for k, v in result.items() if k != "tokens"}


# A task is (message, fn): one measurement, both patch states inside it, so
# that a run cut short by its deadline keeps complete comparisons. The
# headline measurements of every model come first, the rest of the grid after.
Task = Tuple[str, Callable[[], None]]
KEY = (4, 0.8)  # the (k, p) the targets are stated at


def _run_key(label: str, run: str, every: int) -> str:
    # Runs that submit the verify pass in pieces are told apart by a suffix.
    return f"{label} {run}" + (f" every={every}" if every else "")


def model_tasks(name, path, results, *, max_tokens, repeats, acceptances, draft_tokens, draft_path,
                verify_ms, submit_every=(0,)) -> Tuple[List[Task], List[Task]]:
    """(headline tasks, the rest) for one target model."""
    from .speculative import AcceptanceControlledDrafter, DraftModelDrafter

    loaded = {}
    plain_tokens = {}

    def target():
        if "model" not in loaded:
            from mlx_lm import load

            loaded["model"], tokenizer = load(str(path))
            loaded["prompt"] = prompt_tokens(tokenizer)
            results.put(name, "info", "path", str(path))
            results.put(name, "info", "prompt_tokens", loaded["prompt"].size)
        return loaded["model"], loaded["prompt"]

    def plain():
        model, prompt = target()
        plain_tokens.update(plain_both(name, model, prompt, results, max_tokens, repeats))

    references = {}

    def reference(label, k):
        """The target's greedy continuation as the verify path computes it.

        A verify row can round differently from a decode row (other kernels,
        other M), and random weights have near-ties: where plain decoding and
        the loop part, a reference taken from plain decoding goes stale and
        the measured acceptance falls below p. So the reference is re-recorded
        by the loop itself at p = 1 with the same k (which emits the target's
        own verify-path tokens whatever it is proposed), until it reproduces
        itself. These runs also warm the loop up (first use compiles).
        """
        model, prompt = target()
        if (label, k) not in references:
            tokens, passes = plain_tokens[label], 0
            while passes < 3:
                passes += 1
                drafter = AcceptanceControlledDrafter(tokens + [0] * (k + 1), 1.0, model.args.vocab_size)
                emitted = speculative_decode(model, prompt, drafter, k, max_tokens)["tokens"]
                if emitted == tokens:
                    break
                tokens = emitted
            references[label, k] = (tokens, passes)
        return references[label, k]

    def acceptance(k, p):
        model, prompt = target()
        for label, on in STATES:
            with patch.enabled(on):
                tokens, passes = reference(label, k)
                census = matmul_census(model, k + 1) if on else None
                for every in submit_every:
                    drafter = AcceptanceControlledDrafter(tokens + [0] * (k + 1), p, model.args.vocab_size, seed=k)
                    run = median_run(lambda: speculative_decode(model, prompt, drafter, k, max_tokens, every),
                                     repeats, warmup=False)
                    run["matmuls"] = census
                    # The loop reproduced the reference, so p is the acceptance it ran at.
                    run["matches_reference"] = run["tokens"] == tokens
                    run["matches_plain"] = run["tokens"] == plain_tokens[label]
                    run["reference_passes"] = passes
                    results.put(name, "acceptance", _run_key(label, f"p={p} k={k}", every), _strip(run))

    def verify():
        model, _ = target()
        for label, on in STATES:
            with patch.enabled(on):
                results.put(name, "verify_ms", label, verify_latency(model, verify_ms, 64, 5))

    def parts(M):
        model, _ = target()
        for label, on in STATES:
            with patch.enabled(on):
                results.put(name, "breakdown", f"{label} M={M}", breakdown(model, M, 64, 5))

    def draft(k, warmup):
        model, prompt = target()
        if "draft" not in loaded:
            from mlx_lm import load

            loaded["draft"], _ = load(str(draft_path))
        for label, on in STATES:
            with patch.enabled(on):
                for every in submit_every:
                    run = median_run(
                        lambda: speculative_decode(model, prompt, DraftModelDrafter(loaded["draft"]), k, max_tokens,
                                                   every),
                        repeats, warmup=warmup)
                    results.put(name, "draft", _run_key(label, f"k={k}", every), _strip(run))

    grid = [(k, p) for k in draft_tokens for p in acceptances]
    key = KEY if KEY in grid else grid[0]
    k_key = key[0]
    head = [
        (f"{name}: plain decode", plain),
        (f"{name}: p={key[1]} k={key[0]}", lambda: acceptance(*key)),
        (f"{name}: breakdown M={k_key + 1}", lambda: parts(k_key + 1)),
    ]
    rest = [(f"{name}: p={p} k={k}", lambda k=k, p=p: acceptance(k, p))
            for k, p in grid if (k, p) != key]
    rest += [(f"{name}: verify latency M={verify_ms[0]}..{verify_ms[-1]}", verify),
             (f"{name}: breakdown M=1", lambda: parts(1))]
    if draft_path is not None:
        rest += [(f"{name}: draft model k={k}", lambda k=k, i=i: draft(k, warmup=i == 0))
                 for i, k in enumerate(draft_tokens)]
    return head, rest


def mtp_tasks(name, path, results, *, max_tokens, repeats, draft_tokens, submit_every=(0,)) -> List[Task]:
    from . import mtp
    from .speculative import MTPDrafter

    loaded = {}
    plain_tokens = {}

    def target():
        if not loaded:
            loaded["model"], loaded["head"], tokenizer = mtp.load(str(path))
            loaded["prompt"] = prompt_tokens(tokenizer)
            results.put(name, "info", "path", str(path))
        return loaded["model"], loaded["head"], loaded["prompt"]

    def plain():
        model, _, prompt = target()
        plain_tokens.update(plain_both(name, model, prompt, results, max_tokens, repeats))

    def speculate(k, warmup):
        model, head, prompt = target()
        for label, on in STATES:
            with patch.enabled(on):
                for every in submit_every:
                    run = median_run(
                        lambda: speculative_decode(model, prompt, MTPDrafter(model, head), k, max_tokens, every),
                        repeats, warmup=warmup)
                    run["matches_plain"] = run["tokens"] == plain_tokens[label]
                    results.put(name, "mtp", _run_key(label, f"k={k}", every), _strip(run))

    return [(f"{name}: plain decode", plain)] + [
        (f"{name}: MTP k={k}", lambda k=k, i=i: speculate(k, warmup=i == 0)) for i, k in enumerate(draft_tokens)
    ]


STATES = (("mlx", False), ("patched", True))


def plain_both(name, model, prompt, results, max_tokens, repeats) -> Dict[str, List[int]]:
    """Plain decode unpatched and patched, recorded; each state's tokens."""
    tokens = {}
    for label, on in STATES:
        with patch.enabled(on):
            run = median_run(lambda: plain_decode(model, prompt, max_tokens), repeats)
        tokens[label] = run["tokens"]
        results.put(name, "plain", label, _strip(run))
    return tokens


def device_meta() -> Dict:
    device = plan.current_device()
    return {
        "device": device.name,
        "backend": device.backend,
        "mlx": mx.__version__,
        "mlx_lm": __import__("mlx_lm").__version__,
        "python": platform.python_version(),
        "tuning_table": bool(plan.load_tuning(device.name)),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# -- report ---------------------------------------------------------------------------------


def markdown(doc: Dict) -> str:
    meta = doc["meta"]
    lines = [
        f"# End-to-end decoding — {meta['device']} ({meta['backend']}), MLX {meta['mlx']}, "
        f"mlx-lm {meta['mlx_lm']}",
        "",
        f"Command: `{meta['command']}` ({meta['date']}). Tokens/s of generation (prompt "
        f"excluded), median over {meta.get('repeats', '?')} runs of {meta.get('max_tokens', '?')} tokens.",
    ]
    for name, m in doc["models"].items():
        lines += ["", f"## {name}", ""]
        plain = m.get("plain", {})
        base = plain.get("mlx", {}).get("tps")
        if plain:
            lines += ["| plain decode | tok/s | prompt tok/s | × MLX plain |", "|---|---|---|---|"]
            for label, r in plain.items():
                ratio = r["tps"] / base if base else float("nan")
                lines.append(f"| {label} | {r['tps']:.1f} | {r['prompt_tps']:.0f} | {ratio:.2f} |")
        for section, title in (("acceptance", "acceptance-controlled drafter"), ("draft", "draft model"),
                               ("mtp", "MTP head")):
            rows = m.get(section, {})
            if not rows:
                continue
            lines += ["", f"**Speculative, {title}**", "",
                      "| run | tok/s | × MLX plain | × same loop unpatched | acceptance (per token) "
                      "| tokens/step | verify ms | split-K matmuls of one forward | as recorded |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for key, r in rows.items():
                twin = rows.get(key.replace("patched", "mlx", 1)) if key.startswith("patched") else None
                vs_loop = f"{r['tps'] / twin['tps']:.2f}" if twin and twin["tps"] else ""
                vs_plain = f"{r['tps'] / base:.2f}" if base else ""
                census = r.get("matmuls")
                share = (f"{census['splitk']}/{census['splitk'] + census['mlx']}"
                         if census and census["splitk"] + census["mlx"] else "")
                # Did the loop emit the tokens the drafter proposes from (so the
                # acceptance is the one asked for)? Only the acceptance runs say.
                recorded = {True: "yes", False: "no"}.get(r.get("matches_reference"), "")
                lines.append(
                    f"| {key} | {r['tps']:.1f} | {vs_plain} | {vs_loop} | {r['acceptance_rate']:.2f} "
                    f"({r['per_token_acceptance']:.2f}) | {r['tokens_per_step']:.2f} | {r['verify_ms']:.2f} "
                    f"| {share} | {recorded} |"
                )
        verify = m.get("verify_ms", {})
        if verify:
            Ms = sorted({int(M) for v in verify.values() for M in v})
            lines += ["", "**Verify step (one synchronous forward), ms**", "",
                      "| M | " + " | ".join(verify) + " |", "|---" * (len(verify) + 1) + "|"]
            for M in Ms:
                lines.append(f"| {M} | " + " | ".join(f"{v.get(str(M), float('nan')):.2f}"
                                                       for v in verify.values()) + " |")
        parts = m.get("breakdown", {})
        if parts:
            names = list(next(iter(parts.values())))
            lines += ["", "**Per-forward breakdown, ms (each part timed alone, × layers)**", "",
                      "| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for key, r in parts.items():
                lines.append(f"| {key} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="benchmarks/e2e", help="results directory")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--no-draft", action="store_true", help="skip the draft-model runs")
    parser.add_argument("--no-mtp", action="store_true", help="skip the MTP-head model")
    parser.add_argument("--model-dir", default=None,
                        help="where synthetic models are written (default: the mtp-splitk cache)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--acceptance", default=",".join(map(str, ACCEPTANCES)))
    parser.add_argument("--num-draft-tokens", default=",".join(map(str, DRAFT_TOKENS)))
    parser.add_argument("--submit-every", default="0",
                        help="comma-separated: run each speculative measurement submitting the verify pass "
                             "every N decoder layers (0: whole; see speculative.layers_started_early)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which remaining measurements are skipped")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model, few tokens: checks the harness (CPU), no speed claims")


def run(args) -> Dict:
    """Run the benchmark for parsed ``args``; returns the results document."""
    acceptances = [float(v) for v in args.acceptance.split(",")]
    draft_tokens = [int(v) for v in args.num_draft_tokens.split(",")]
    submit_every = tuple(int(v) for v in args.submit_every.split(","))
    if any(v < 0 for v in submit_every):
        raise ValueError("--submit-every values must be >= 0.")
    if not all(0.0 <= p <= 1.0 for p in acceptances) or not all(k >= 1 for k in draft_tokens):
        raise ValueError("--acceptance values must be in [0, 1] and --num-draft-tokens values >= 1.")
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected some of {list(MODELS)}.")
    if args.model_dir:
        root = Path(args.model_dir)
    else:
        from .cli import cache_dir

        root = cache_dir() / "bench"
    deadline = Deadline(args.deadline)
    meta = device_meta()
    meta.update(max_tokens=args.max_tokens, repeats=args.repeats)
    results = Results(Path(args.out), meta)

    if args.smoke:
        pair = root / f"smoke-v{synthetic.FORMAT_VERSION}"
        if not (pair / "draft" / "config.json").exists():
            synthetic.write_pair(pair)
        jobs = [("tiny-llama", pair / "target", None if args.no_draft else pair / "draft")]
        mtp_model = ("qwen3_next", "tiny")
        verify_ms = (1, 3, 5)
    else:
        jobs = []
        for n in names:
            family, size, draft_family, draft_size = MODELS[n]
            print(f"{n}: synthetic model directories under {root} (written on first use)", file=sys.stderr, flush=True)
            target = model_dir(root, family, size, progress=Progress.bytes)
            draft = None if args.no_draft else model_dir(root, draft_family, draft_size, progress=Progress.bytes)
            jobs.append((n, target, draft))
        mtp_model = MTP_MODEL
        verify_ms = VERIFY_MS
    if args.no_mtp:
        mtp_model = None

    common = dict(max_tokens=args.max_tokens, repeats=args.repeats, draft_tokens=draft_tokens,
                  submit_every=submit_every)
    heads, rests = [], []
    for name, target, draft in jobs:
        head, rest = model_tasks(name, target, results, acceptances=acceptances, draft_path=draft,
                                 verify_ms=verify_ms, **common)
        heads += head
        rests += rest
    tasks = heads + rests
    if mtp_model is not None:
        family, size = mtp_model
        name = f"{family}-{size}-mtp"
        tasks += mtp_tasks(name, model_dir(root, family, size, mtp=True), results, **common)

    progress = Progress(len(tasks))
    for message, task in tasks:
        if not progress.step(deadline, message):
            break
        task()
    results.doc["meta"]["complete"] = progress.done == len(tasks)
    results.save()
    progress.finish()
    return results.doc


class Progress:
    """A progress bar on stderr: measurements done of those planned, the
    elapsed time and what runs now."""

    WIDTH = 24

    def __init__(self, total: int, stream=None):
        self.total = total
        self.done = 0
        self.stopped = False
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def step(self, deadline: Deadline, message: str) -> bool:
        """Announce the next measurement; False once the deadline passed."""
        if deadline.passed():
            if not self.stopped:
                print(f"Deadline passed: skipping the last {self.total - self.done} of {self.total} "
                      "measurements.", file=self.stream, flush=True)
            self.stopped = True
            return False
        self.done += 1
        filled = self.WIDTH * (self.done - 1) // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        print(f"[{bar}] {self.done}/{self.total} {time.monotonic() - self.start:6.0f}s  {message}",
              file=self.stream, flush=True)
        return True

    @staticmethod
    def bytes(done: int, total: int) -> None:
        # About every GiB, and at the end.
        if total and (done == total or done % (1 << 30) < (1 << 26)):
            print(f"  written {done / 2**30:.1f} of {total / 2**30:.1f} GiB", file=sys.stderr, flush=True)

    def finish(self) -> None:
        print(f"Done: {self.done}/{self.total} measurements in {time.monotonic() - self.start:.0f}s.",
              file=self.stream, flush=True)
