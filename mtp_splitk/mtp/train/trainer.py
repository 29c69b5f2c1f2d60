# Copyright © 2026 mtp_splitk contributors

"""The training run: generate, train, checkpoint, evaluate, export.

Everything a run needs to continue lives in ``OUT/train_state``: the
generated sequences (``data.safetensors``, ``eval.safetensors``), the head in
float32, the optimizer state and ``state.json`` (step, trained tokens, the
model it belongs to). Rerunning the same command continues: generation
resumes at the first missing chunk, training at the saved step, with the
batches an uninterrupted run would have seen (without ``--minutes`` the
result is the same). Every checkpoint also refreshes ``OUT/mtp.safetensors``,
so the head of an interrupted run is usable.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_config, load_model, load_tokenizer

from ..families import family_for, model_module
from ..loading import _without_mtp, load_head, read_weights, resolve
from ..target import TargetParts
from .data import Batches, Sequences, generate_into
from .evaluate import acceptance
from .export import STATE_DIR, link_model, write_head
from .objective import build_head, step_loss
from .prompts import encode, prompts
from .teacher import TeacherCache


@dataclass
class TrainConfig:
    """The knobs of a run (``mtp-splitk train-mtp`` flags); defaults suit a GPU."""

    model: str
    out: str
    prompts: int = 4096  # training prompts (one sampled continuation each)
    max_tokens: int = 256  # generated tokens per sequence at most
    temperature: float = 0.8
    gen_batch: int = 128  # sequences generated together
    eval_prompts: int = 64
    eval_tokens: int = 128
    batch_size: int = 16  # sequences per training step
    steps: int = 3000
    lr: float = 5e-4
    warmup: int = 50
    minutes: Optional[float] = None  # wall-clock budget of this run, all phases
    gen_fraction: float = 0.5  # of the budget, at most, for generating text
    depth: int = 2  # unrolled head steps in the loss
    top_k: int = 64  # teacher top-k, cached once (0: whole vocabulary, every step)
    hidden_weight: float = 1.0
    init: str = "last-layer"
    log_every: int = 20
    save_every: int = 200
    stop_after: Optional[int] = None  # steps in this run, then checkpoint
    seed: int = 0


def _log(message: str):
    print(f"[train-mtp] {message}", file=sys.stderr, flush=True)


def _save_json(path: Path, value):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _acceptance_line(result) -> str:
    drafts = ", ".join(f"{a:.3f}" for a in result["accept"])
    expected = 1 + sum(result["chain"])
    return (
        f"held-out acceptance of drafts 1-{len(result['accept'])}: {drafts} "
        f"({result['positions']} positions; {expected:.2f} tokens per target call)"
    )


def train(cfg: TrainConfig, log: Callable[[str], None] = _log) -> dict:
    """Run (or continue) training; returns the final ``state.json`` dict."""
    start = time.monotonic()
    deadline = None if cfg.minutes is None else start + 60 * cfg.minutes
    model_path = resolve(cfg.model)
    config = load_config(model_path)
    family_for(model_module(config))  # an unsupported family fails before loading
    model, config = load_model(model_path, get_model_classes=_without_mtp())
    tokenizer = load_tokenizer(model_path, eos_token_ids=config.get("eos_token_id"))
    parts = TargetParts(model)
    text = getattr(model, "language_model", model)
    export_dtype = text.model.norm.weight.dtype

    out = Path(cfg.out)
    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.json"
    source = str(model_path.resolve())
    state = {"model": source, "step": 0, "tokens": 0, "train_seconds": 0.0}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["model"] != source:
            raise ValueError(
                f"{out} holds training for {state['model']}, not {source}; "
                "give another --out"
            )
    link_model(model_path, out)

    # -- text -------------------------------------------------------------------------------
    budget_text = "" if cfg.minutes is None else f" within {cfg.minutes:g} min"
    log(
        f"plan: {cfg.prompts} sequences of <= {cfg.max_tokens} sampled tokens "
        f"(T={cfg.temperature:g}, {cfg.gen_batch} at a time), {cfg.steps} steps of "
        f"{cfg.batch_size} sequences (depth {cfg.depth}){budget_text}; held out: "
        f"{cfg.eval_prompts} greedy sequences of <= {cfg.eval_tokens} tokens"
    )
    train_texts, eval_texts = prompts(cfg.prompts, cfg.eval_prompts, cfg.seed)
    eval_data = Sequences.load(state_dir / "eval.safetensors")
    generate_into(
        eval_data,
        model,
        tokenizer,
        [encode(tokenizer, t) for t in eval_texts],
        max_tokens=cfg.eval_tokens,
        temperature=0.0,
        batch_size=cfg.gen_batch,
        seed=cfg.seed,
        save=lambda d: d.save(state_dir / "eval.safetensors"),
    )
    data = Sequences.load(state_dir / "data.safetensors")
    gen_start, gen_before = time.monotonic(), data.generated

    def gen_progress(d: Sequences):
        rate = (d.generated - gen_before) / (time.monotonic() - gen_start)
        left = (len(train_texts) - len(d)) * cfg.max_tokens / max(rate, 1e-9)
        log(
            f"generated {len(d)}/{len(train_texts)} sequences, {d.generated} tokens "
            f"({rate:.0f} tokens/s; at most ~{left / 60:.1f} min to go)"
        )

    generate_into(
        data,
        model,
        tokenizer,
        [encode(tokenizer, t) for t in train_texts],
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.gen_batch,
        seed=cfg.seed + 1,
        save=lambda d: d.save(state_dir / "data.safetensors"),
        keep_going=lambda: deadline is None
        or len(data) == 0  # at least one chunk, whatever the budget
        or time.monotonic() - start < cfg.gen_fraction * 60 * cfg.minutes,
        progress=gen_progress,
    )
    if len(data) < len(train_texts):
        log(f"time budget: training on the {len(data)} sequences generated so far")

    # -- head and optimizer -----------------------------------------------------------------
    mx.random.seed(cfg.seed)
    head_path = state_dir / "head.safetensors"
    head = build_head(model, config, "random" if head_path.exists() else cfg.init)
    optimizer = optim.Adam(learning_rate=cfg.lr)
    if head_path.exists():
        head.load_weights(str(head_path), strict=True)
        optimizer.state = tree_unflatten(
            list(mx.load(str(state_dir / "optimizer.safetensors")).items())
        )
        log(f"resumed at step {state['step']}")

    def save():
        mx.save_safetensors(str(head_path), dict(tree_flatten(head.parameters())))
        mx.save_safetensors(
            str(state_dir / "optimizer.safetensors"),
            dict(tree_flatten(optimizer.state)),
        )
        write_head(head, model, config, out, export_dtype)
        _save_json(state_path, state)

    if state["step"] == 0 and "initial_eval" not in state:
        t = time.monotonic()
        state["initial_eval"] = acceptance(head, parts, eval_data, batch_size=64)
        state["eval_seconds"] = time.monotonic() - t
        log("before training: " + _acceptance_line(state["initial_eval"]))
    reserve = 1.5 * state.get("eval_seconds", 0.0) + 5.0  # final eval and export

    # -- training ---------------------------------------------------------------------------
    cache = None
    if cfg.top_k > 0 and state["step"] < cfg.steps:
        t = time.monotonic()
        cache = TeacherCache(parts, data, cfg.top_k, batch_size=cfg.gen_batch)
        log(
            f"target outputs cached (hidden states, top-{cfg.top_k} logits) in "
            f"{time.monotonic() - t:.1f} s"
        )
    batches = Batches(data, cfg.batch_size, cfg.seed)
    loss_and_grad = nn.value_and_grad(
        head,
        lambda *batch: step_loss(
            head,
            parts,
            *batch,
            depth=cfg.depth,
            top_k=cfg.top_k,
            hidden_weight=cfg.hidden_weight,
        ),
    )
    train_start, first_step = time.monotonic(), state["step"]
    budget = None if deadline is None else deadline - reserve - train_start
    agree, window_tokens, window_start = None, 0, time.monotonic()
    log(
        f"training steps {state['step']}..{cfg.steps} on {len(data)} sequences "
        f"({data.generated} generated tokens), batch {batches.batch_size}"
    )
    while state["step"] < cfg.steps:
        ran = state["step"] - first_step
        elapsed = time.monotonic() - train_start
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            break
        if budget is not None and elapsed >= budget:
            log(f"time budget: stopping at step {state['step']}")
            break
        progress = state["step"] / cfg.steps
        if budget is not None:
            progress = max(progress, elapsed / max(budget, 1e-9))
        optimizer.learning_rate = _lr(cfg, state["step"], progress)
        tokens, lengths, prompt_lens = batches(state["step"])
        batch = (tokens, lengths, prompt_lens)
        if cache is not None:
            batch += (cache.batch(batches.rows(state["step"]), tokens.shape[1]),)
        (loss, metrics), grads = loss_and_grad(*batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(head, grads)
        mx.eval(head.parameters(), optimizer.state, loss, metrics)
        state["step"] += 1
        step_tokens = int(lengths.sum())
        state["tokens"] += step_tokens
        window_tokens += step_tokens
        a = metrics["agree"].item()
        agree = a if agree is None else 0.9 * agree + 0.1 * a
        if ran + 1 == min(5, cfg.steps - first_step):  # an estimate, once warmed up
            per_step = (time.monotonic() - train_start) / (ran + 1)
            todo = cfg.steps - state["step"]
            fits = (
                "" if budget is None else f", the budget fits ~{budget / per_step:.0f}"
            )
            log(
                f"~{per_step:.2f} s/step: {todo} more steps ~{todo * per_step / 60:.1f} "
                f"min{fits}"
            )
        if state["step"] % cfg.log_every == 0:
            rate = window_tokens / (time.monotonic() - window_start)
            log(
                f"step {state['step']}/{cfg.steps} loss {loss.item():.4f} "
                f"(kl {metrics['kl'].item():.4f}, hidden {metrics['hidden'].item():.4f}) "
                f"agree~{agree:.3f} lr {optimizer.learning_rate.item():.2e} "
                f"{rate:.0f} tokens/s"
            )
            window_tokens, window_start = 0, time.monotonic()
            state.setdefault("history", []).append(
                {"step": state["step"], "loss": loss.item(), "agree": agree}
            )
        if state["step"] % cfg.save_every == 0:
            save()
    state["train_seconds"] += time.monotonic() - train_start
    save()

    # -- the exported head, as users load it ------------------------------------------------
    t = time.monotonic()
    exported = load_head(model, config, read_weights(out), where=out)
    state["eval"] = acceptance(exported, parts, eval_data, batch_size=64)
    state["eval_seconds"] = time.monotonic() - t
    state["generated_tokens"] = data.generated
    state["sequences"] = len(data)
    state["config"] = asdict(cfg)
    _save_json(state_path, state)
    log(
        f"step {state['step']}, {state['train_seconds'] / 60:.1f} min training in all, "
        f"{data.generated} generated tokens; " + _acceptance_line(state["eval"])
    )
    return state


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then a cosine from ``lr`` to ``lr / 10`` over the run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
