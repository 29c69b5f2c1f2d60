# Copyright © 2026 mtp_splitk contributors

"""Measurements of one loaded model: decoding runs, forward latency and its
parts, where the quantized matmuls go, and greedy tokens and logits
unpatched vs patched (:data:`STATES`)."""

import time
from typing import Callable, Dict, List, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from .. import ops, patch
from ..speculative import Stats, speculative_generate_step
from ..speculative.decode import decode_generate_step
from ..speculative.pipelined import Pipeline
from .timing import median_call_us

STATES = (("mlx", False), ("patched", True))  # (label, patch enabled)
PROMPT = "Speculative decoding drafts a few tokens with a cheap model and verifies them"


def prompt_tokens(tokenizer) -> mx.array:
    return mx.array(tokenizer.encode(PROMPT))


# -- decoding -------------------------------------------------------------------------------


def _tokens_per_second(times: List[float], first_burst: int) -> float:
    """Tokens after the first step over the time they took."""
    n = len(times) - first_burst
    span = times[-1] - times[first_burst - 1]
    return n / span if n > 0 and span > 0 else 0.0


def plain_decode(model, prompt: mx.array, max_tokens: int, compiled: bool = False) -> Dict:
    """mlx-lm's own generate_step (asynchronously pipelined decode), or with
    ``compiled`` the plugin's (the overlapped loop at k = 0, its step compiled)."""
    stats = Stats()
    steps = (
        decode_generate_step(prompt, model, max_tokens=max_tokens, stats=stats)
        if compiled else generate_step(prompt, model, max_tokens=max_tokens)
    )
    tic = time.perf_counter()
    times, tokens = [], []
    for token, _ in steps:
        times.append(time.perf_counter())
        tokens.append(int(token))
    run = {
        "tps": _tokens_per_second(times, 1),
        "prompt_tps": prompt.size / (times[0] - tic),
        "tokens": tokens,
    }
    if compiled:  # where the loop could not take the model, generate_step ran
        run.update(compiled_steps=stats.compiled_steps, steps=stats.steps,
                   **(stats.host_split_ms() if stats.overlapped else {}))
    return run


LOOPS = ("overlap", "sync")  # and "compiled" (overlapped, mx.compile), "every=N" (synchronous, submitted every N layers)


def loop_options(loop: str) -> Dict:
    """speculative_generate_step's options for a loop variant of :data:`LOOPS`."""
    if loop == "overlap":
        return {"overlap": True, "compile_step": False}
    if loop == "sync":
        return {"overlap": False}
    if loop == "compiled":
        return {"overlap": True, "compile_step": True}
    if loop.startswith("every=") and loop[6:].isdigit() and int(loop[6:]) > 0:
        return {"overlap": False, "submit_every": int(loop[6:])}
    raise ValueError(f"a loop is 'overlap', 'compiled', 'sync' or 'every=N' (N > 0), not {loop!r}.")


def speculative_decode(
    model, prompt: mx.array, drafter, k: int, max_tokens: int, loop: str = "overlap"
) -> Dict:
    """The speculative loop's tokens/s (after the first step) and statistics."""
    stats = Stats()
    times, tokens = [], []
    steps = speculative_generate_step(
        prompt,
        model,
        drafter,
        num_draft_tokens=k,
        max_tokens=max_tokens,
        stats=stats,
        **loop_options(loop),
    )
    for token, _, _ in steps:
        times.append(time.perf_counter())
        tokens.append(int(token))
    first_burst = stats.accepted_per_step[0] + 1 if stats.steps else 1
    tps = _tokens_per_second(times, first_burst)
    return {
        "tps": tps,
        "prompt_tps": stats.prompt_tps,
        "steps": stats.steps,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": stats.acceptance_rate,
        "per_token_acceptance": stats.per_token_acceptance,
        "tokens_per_step": stats.tokens_per_step,
        "step_ms": 1e3 * stats.tokens_per_step / tps if tps else 0.0,  # wall time a step
        "verify_ms": 1e3 * stats.mean_verify_time,
        "overlapped": stats.overlapped,  # then no verify time: nothing waits for a verdict
        "overlap_off": stats.overlap_off,  # why not, where the overlapped loop was asked for
        **(stats.host_split_ms() if stats.overlapped else {}),  # host build / submit / wait a step
        "compiled_steps": stats.compiled_steps,  # the "compiled" loop: steps that took mx.compile
        "tokens": tokens,
    }


def lazy_pipeline(model, prompt: mx.array, drafter, k: int, steps: int, compile_step: bool = False):
    """(pipeline, step 0): the overlapped loop's Pipeline with its steps left
    unevaluated until asked for, begun on ``prompt`` (step 0 evaluated), with
    room for ``steps`` more steps as if every one accepted all."""
    pipeline = Pipeline(model, drafter, make_prompt_cache(model), k, submit=False, compile_step=compile_step)
    offset, first = pipeline.begin(prompt)
    pipeline.reserve(offset, steps)
    mx.eval(first[0].token, first[2])
    return pipeline, first


def step_split_ms(model, prompt: mx.array, drafter, k: int, steps: int = 32, compile_step: bool = False) -> Dict:
    """Where an overlapped step's time goes: ``steps`` steps are built
    lazily first (host build, ms per step), then evaluated at once (ms per
    step). The evaluation is no GPU time: one graph of ``steps`` steps ran
    slower than the loop's own steps (run 13b: 10.4 against 6.5 ms); take
    GPU time from ``scripts/profile_step.py``. One step is built untimed
    first: with ``compile_step`` it is the trace at the chain's cache size."""
    pipeline, current = lazy_pipeline(model, prompt, drafter, k, steps + 1, compile_step)
    current = pipeline.step(current)
    tic = time.perf_counter()
    for _ in range(steps):
        current = pipeline.step(current)
    built = time.perf_counter()
    mx.eval(current[0].token, current[2])
    done = time.perf_counter()
    pipeline.close()
    return {"host_build_ms": 1e3 * (built - tic) / steps, "chain_eval_ms": 1e3 * (done - built) / steps}


# -- forward passes -------------------------------------------------------------------------


def _ms(fn: Callable, reps: int) -> float:
    """Median ms of ``fn()`` evaluated, after two warm-up calls."""
    return 1e-3 * median_call_us(lambda: mx.eval(fn()), reps=reps, warmup=2)


def _text(model):
    """The text model (Qwen3.5 wraps it as ``language_model``)."""
    return getattr(model, "language_model", model)


def warm_cache(model, context: int):
    """A prompt cache holding ``context`` tokens."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.arange(context)[None] % _text(model).args.vocab_size, cache=cache))
    return cache


def _forward_trim(model, cache, M: int):
    """One forward of M rows on ``cache``, evaluated, then trimmed back off it."""
    out = model((mx.arange(M)[None] * 5 + 1) % _text(model).args.vocab_size, cache=cache)
    mx.eval(out)
    trim_prompt_cache(cache, M)
    return out


def verify_latency(model, Ms, context: int, reps: int) -> Dict[int, float]:
    """Median ms of one synchronous forward of M rows after ``context`` tokens,
    the cache trimmed back after each call (the verify step's shape)."""
    cache = warm_cache(model, context)
    return {M: _ms(lambda: _forward_trim(model, cache, M), reps) for M in Ms}


def breakdown(model, M: int, context: int, reps: int) -> Dict[str, float]:
    """ms per forward of M rows spent in each part, each timed alone
    (synchronously, as many calls as the model makes) and scaled by the
    number of layers that have it: attention (projections, RoPE, SDPA,
    norms), Gated DeltaNet (hybrid models' linear layers), MLP or MoE
    block, the LM head, and the whole forward for comparison."""
    layers = model.layers
    dim = layers[0].input_layernorm.weight.shape[0]
    cache = warm_cache(model, context)
    x = (mx.random.normal((1, M, dim)) * 0.5).astype(mx.bfloat16)
    mx.eval(x)
    mask = "causal" if M > 1 else None
    linear = [i for i, layer in enumerate(layers) if getattr(layer, "is_linear", False)]
    full = [i for i in range(len(layers)) if i not in linear]
    a = full[len(full) // 2]

    def attention():
        out = layers[a].self_attn(layers[a].input_layernorm(x), mask=mask, cache=cache[a])
        trim_prompt_cache([cache[a]], M)
        return out

    layer = layers[len(layers) // 2]  # a MoE layer where a model mixes dense ones
    mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")
    text = _text(model)
    head = text.lm_head if hasattr(text, "lm_head") else text.model.embed_tokens.as_linear
    norm = text.model.norm
    whole = _ms(lambda: _forward_trim(model, cache, M), reps)
    parts = {"attention": len(full) * _ms(attention, reps)}
    if linear:
        g = linear[len(linear) // 2]
        state = list(cache[g].cache)

        def gdn():
            out = layers[g].linear_attn(layers[g].input_layernorm(x), None, cache[g])
            cache[g].cache = list(state)  # the recurrent state as before the call
            return out

        parts["gdn"] = len(linear) * _ms(gdn, reps)
    parts["mlp"] = len(layers) * _ms(lambda: mlp(layer.post_attention_layernorm(x)), reps)
    parts["lm_head"] = _ms(lambda: head(norm(x)), reps)
    parts["forward"] = whole
    parts["rest"] = whole - sum(v for k, v in parts.items() if k != "forward")
    return parts


def matmul_census(model, M: int) -> Dict[str, int]:
    """Where the quantized matmuls of one forward of M rows go: the split-K
    kernels (a plan) or MLX's ops (none), from an untimed call."""
    with ops.recording() as calls:
        mx.eval(model(mx.arange(M)[None], cache=make_prompt_cache(model)))
    splitk = sum(call.plan is not None for call in calls)
    return {"splitk": splitk, "mlx": len(calls) - splitk}


# -- unpatched vs patched -------------------------------------------------------------------

# name -> a function of the target that makes a fresh drafter
Drafters = Dict[str, Callable[[nn.Module], object]]


def greedy_runs(
    model: nn.Module,
    prompt: mx.array,
    max_tokens: int,
    drafters: Drafters,
    num_draft_tokens: int = 3,
) -> Dict[str, Dict[str, List[int]]]:
    """Greedy tokens of mlx-lm's plain loop and of the speculative loop with
    each drafter, unpatched and patched: {"mlx" | "patched": {run: tokens}}."""
    out = {}
    for label, on in STATES:
        with patch.enabled(on):
            runs = {
                "plain": [int(t) for t, _ in generate_step(prompt, model, max_tokens=max_tokens)]
            }
            for name, make in drafters.items():
                steps = speculative_generate_step(
                    prompt,
                    model,
                    make(model),
                    num_draft_tokens=num_draft_tokens,
                    max_tokens=max_tokens,
                )
                runs[name] = [int(t) for t, _, _ in steps]
        out[label] = runs
    return out


def probe_logits(model: nn.Module, prompt: mx.array, rows: Sequence[int]) -> Dict[str, list]:
    """float32 logits of the prompt's last position and of one verify-sized
    call of ``rows`` after it, unpatched and patched: {"mlx" | "patched": rows x V}.
    A check that does not depend on how varied a random model's tokens are."""
    out = {}
    for label, on in STATES:
        with patch.enabled(on):
            cache = make_prompt_cache(model)
            last = model(prompt[None], cache=cache)[0, -1:]
            verify = model(mx.array(rows)[None], cache=cache)[0]
            logits = mx.concatenate([last, verify]).astype(mx.float32)
            out[label] = logits.tolist()
    return out
