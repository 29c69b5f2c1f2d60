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
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_config, load_model, load_tokenizer

from ...plan import current_device
from ..families import family_for, model_module
from ..loading import _without_mtp, load_head, read_weights, resolve
from ...speculative.target import TargetParts
from .config import TrainConfig
from .data import Batches, Sequences, generate_into
from .evaluate import acceptance
from .export import STATE_DIR, link_model, write_head
from .objective import build_head, head_from, step_loss
from .prompts import encode, prompts
from .teacher import TeacherCache


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
    run = _Run(cfg, log)
    data, eval_data = run.text()
    run.make_head()
    if run.state["step"] == 0 and "initial_eval" not in run.state:
        t = time.monotonic()
        run.state["initial_eval"] = acceptance(run.head, run.parts, eval_data, 3, 64)
        run.state["eval_seconds"] = time.monotonic() - t
        log("before training: " + _acceptance_line(run.state["initial_eval"]))
    run.fit(data)
    return run.finish(data, eval_data)


TEACHER_ROWS = 128


class _Run:
    """One invocation: the target, the output directory and the saved state."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.start = time.monotonic()
        self.deadline = None if cfg.minutes is None else self.start + 60 * cfg.minutes
        self.model_path = resolve(cfg.model)
        config = load_config(self.model_path)
        family_for(model_module(config))  # an unsupported family fails before loading
        self.model, self.config = load_model(
            self.model_path, get_model_classes=_without_mtp()
        )
        self.tokenizer = load_tokenizer(
            self.model_path, eos_token_ids=self.config.get("eos_token_id")
        )
        self.parts = TargetParts(self.model)
        text = getattr(self.model, "language_model", self.model)
        self.export_dtype = text.model.norm.weight.dtype

        self.out = Path(cfg.out)
        self.state_dir = self.out / STATE_DIR
        self.state_dir.mkdir(parents=True, exist_ok=True)
        source = str(self.model_path.resolve())
        self.state = {"model": source, "step": 0, "tokens": 0, "train_seconds": 0.0}
        if (self.state_dir / "state.json").exists():
            self.state = json.loads((self.state_dir / "state.json").read_text())
            if self.state["model"] != source:
                raise ValueError(
                    f"{self.out} holds training for {self.state['model']}, not "
                    f"{source}; give another --out"
                )
        link_model(self.model_path, self.out)

    def text(self):
        """The held-out greedy sequences and the sampled training sequences,
        generated where missing (within ``gen_fraction`` of the budget)."""
        cfg, log = self.cfg, self.log
        budget = "" if cfg.minutes is None else f" within {cfg.minutes:g} min"
        log(
            f"plan: {cfg.prompts} sequences of <= {cfg.max_tokens} sampled tokens "
            f"(T={cfg.temperature:g}, {cfg.gen_batch} at a time), {cfg.steps} steps of "
            f"{cfg.batch_size} sequences (depth {cfg.depth}){budget}; held out: "
            f"{cfg.eval_prompts} greedy sequences of <= {cfg.eval_tokens} tokens"
        )
        train_texts, eval_texts = prompts(cfg.prompts, cfg.eval_prompts, cfg.seed)
        eval_path = self.state_dir / "eval.safetensors"
        eval_data = Sequences.load(eval_path)
        generate_into(
            eval_data,
            self.model,
            self.tokenizer,
            [encode(self.tokenizer, t) for t in eval_texts],
            max_tokens=cfg.eval_tokens,
            temperature=0.0,
            batch_size=cfg.gen_batch,
            seed=cfg.seed,
            save=lambda d: d.save(eval_path),
        )
        data_path = self.state_dir / "data.safetensors"
        data = Sequences.load(data_path)
        gen_start, gen_before = time.monotonic(), data.generated

        def progress(d: Sequences):
            rate = (d.generated - gen_before) / (time.monotonic() - gen_start)
            left = (len(train_texts) - len(d)) * cfg.max_tokens / max(rate, 1e-9)
            log(
                f"generated {len(d)}/{len(train_texts)} sequences, {d.generated} "
                f"tokens ({rate:.0f} tokens/s; at most ~{left / 60:.1f} min to go)"
            )

        def keep_going():
            if self.deadline is None or len(data) == 0:  # at least one chunk
                return True
            return time.monotonic() - self.start < cfg.gen_fraction * 60 * cfg.minutes

        generate_into(
            data,
            self.model,
            self.tokenizer,
            [encode(self.tokenizer, t) for t in train_texts],
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            batch_size=cfg.gen_batch,
            seed=cfg.seed + 1,
            save=lambda d: d.save(data_path),
            keep_going=keep_going,
            progress=progress,
        )
        if len(data) < len(train_texts):
            log(f"time budget: training on the {len(data)} sequences generated so far")
        return data, eval_data

    def make_head(self):
        """A fresh head and optimizer, or the saved ones."""
        mx.random.seed(self.cfg.seed)
        saved = (self.state_dir / "head.safetensors").exists()
        if self.cfg.init_from and not saved:
            self.head = head_from(self.model, self.config, self.cfg.init_from)
        else:
            init = "random" if saved else self.cfg.init
            self.head = build_head(self.model, self.config, init)
        self.optimizer = optim.Adam(learning_rate=self.cfg.lr)
        if saved:
            self.head.load_weights(
                str(self.state_dir / "head.safetensors"), strict=True
            )
            self.optimizer.state = tree_unflatten(
                list(mx.load(str(self.state_dir / "optimizer.safetensors")).items())
            )
            self.log(f"resumed at step {self.state['step']}")

    def save(self):
        """Checkpoint (head, optimizer, state) and refresh ``mtp.safetensors``."""
        flat = dict(tree_flatten(self.head.parameters()))
        mx.save_safetensors(str(self.state_dir / "head.safetensors"), flat)
        mx.save_safetensors(
            str(self.state_dir / "optimizer.safetensors"),
            dict(tree_flatten(self.optimizer.state)),
        )
        write_head(self.head, self.model, self.config, self.out, self.export_dtype)
        _save_json(self.state_dir / "state.json", self.state)

    def fit(self, data: Sequences):
        """Train up to ``steps`` (or ``stop_after``, or the budget less the
        final evaluation's expected time), checkpointing every ``save_every``."""
        cfg, log, state = self.cfg, self.log, self.state
        cache = None
        if cfg.top_k > 0 and state["step"] < cfg.steps:
            t = time.monotonic()
            # Rows a teacher forward takes: its logits are rows x length x vocabulary, and 512
            # rows of SmolLM2's overflowed a CUDA launch (run 13b).
            cache = TeacherCache(self.parts, data, cfg.top_k, batch_size=min(cfg.gen_batch, TEACHER_ROWS))
            log(
                f"target outputs cached (hidden states, top-{cfg.top_k} logits) in "
                f"{time.monotonic() - t:.1f} s"
            )
        batches = Batches(data, cfg.batch_size, cfg.seed)
        loss_and_grad = nn.value_and_grad(
            self.head,
            lambda *batch: step_loss(
                self.head,
                self.parts,
                *batch,
                depth=cfg.depth,
                top_k=cfg.top_k,
                hidden_weight=cfg.hidden_weight,
            ),
        )
        reserve = 1.5 * state.get("eval_seconds", 0.0) + 5.0  # final eval, export
        train_start, first_step = time.monotonic(), state["step"]
        budget = (
            None if self.deadline is None else self.deadline - reserve - train_start
        )
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
            self.optimizer.learning_rate = _lr(cfg, state["step"], progress)
            batch = batches(state["step"])
            if cache is not None:
                rows = batches.rows(state["step"])
                batch += (cache.batch(rows, batch[0].shape[1]),)
            (loss, metrics), grads = loss_and_grad(*batch)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            self.optimizer.update(self.head, grads)
            mx.eval(self.head.parameters(), self.optimizer.state, loss, metrics)
            state["step"] += 1
            step_tokens = int(batch[1].sum())
            state["tokens"] += step_tokens
            window_tokens += step_tokens
            a = metrics["agree"].item()
            agree = a if agree is None else 0.9 * agree + 0.1 * a
            if ran + 1 == min(5, cfg.steps - first_step):  # an estimate, warmed up
                per_step = (time.monotonic() - train_start) / (ran + 1)
                todo = cfg.steps - state["step"]
                fits = (
                    ""
                    if budget is None
                    else f"; the budget fits ~{budget / per_step:.0f}"
                )
                log(
                    f"~{per_step:.2f} s/step: {todo} more steps "
                    f"~{todo * per_step / 60:.1f} min{fits}"
                )
            if state["step"] % cfg.log_every == 0:
                rate = window_tokens / (time.monotonic() - window_start)
                log(
                    f"step {state['step']}/{cfg.steps} loss {loss.item():.4f} (kl "
                    f"{metrics['kl'].item():.4f}, hidden {metrics['hidden'].item():.4f})"
                    f" agree~{agree:.3f} lr {self.optimizer.learning_rate.item():.2e} "
                    f"{rate:.0f} tokens/s"
                )
                window_tokens, window_start = 0, time.monotonic()
                state.setdefault("history", []).append(
                    {"step": state["step"], "loss": loss.item(), "agree": agree}
                )
            if state["step"] % cfg.save_every == 0:
                self.save()
        state["train_seconds"] += time.monotonic() - train_start
        self.save()

    def finish(self, data: Sequences, eval_data: Sequences) -> dict:
        """Evaluate the exported head, loaded the way users load it."""
        t = time.monotonic()
        exported = load_head(self.model, self.config, read_weights(self.out), self.out)
        state = self.state
        state["eval"] = acceptance(exported, self.parts, eval_data, 3, 64)
        state["eval_seconds"] = time.monotonic() - t
        state["generated_tokens"] = data.generated
        state["sequences"] = len(data)
        state["config"] = asdict(self.cfg)
        device = current_device()
        state["device"] = f"{device.name} ({device.backend})"  # the record names its machine
        _save_json(self.state_dir / "state.json", state)
        self.log(
            f"step {state['step']}, {state['train_seconds'] / 60:.1f} min training in "
            f"all, {data.generated} generated tokens; "
            + _acceptance_line(state["eval"])
        )
        return state


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then a cosine from ``lr`` to ``lr / 10`` over the run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
