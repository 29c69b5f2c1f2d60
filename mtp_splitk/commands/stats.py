# Copyright © 2026 mtp_splitk contributors

"""What ``mtp-splitk generate --stats`` observes and prints."""

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import mlx.core as mx


@dataclass
class Recorder:
    """What ``--stats`` observes of one mlx-lm generation.

    ``from_draft`` comes from mlx-lm's responses. ``calls`` are the target's
    forward passes as (rows, seconds): with a draft model each is timed
    synchronously (the drafts are evaluated first, the logits after), so a
    verify time is the target's M = k+1 forward alone.

    With ``--mtp`` the loop runs the target as backbone + LM head (the head
    needs its hidden states), never through ``model.__call__``, so there are
    no calls to time; ``loop`` (the loop's own ``speculative.Stats``) gives
    the steps, the drafts and the verify time instead. Its verify time is
    synchronised the same way, but it is a total: a mean, no median.
    """

    from_draft: List[bool] = field(default_factory=list)
    calls: List[Tuple[int, float]] = field(default_factory=list)
    loop: Optional[Any] = None  # mtp_splitk.speculative.Stats, with --mtp
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0

    def add(self, response) -> None:
        self.from_draft.append(bool(response.from_draft))
        self.prompt_tokens = response.prompt_tokens
        self.prompt_tps = response.prompt_tps
        self.generation_tokens = response.generation_tokens
        self.generation_tps = response.generation_tps

    def verify_calls(self) -> List[Tuple[int, float]]:
        """The target calls after the prompt: mlx-lm's speculative loop first
        prefills all prompt tokens but the last, then verifies once per step."""
        prefill = max(self.prompt_tokens - 1, 0)
        done = 0
        for i, (rows, _) in enumerate(self.calls):
            if done >= prefill:
                return self.calls[i:]
            done += rows
        return []

    def accepted_per_step(self) -> List[int]:
        """Each step yields its accepted drafts, then one token of the target's."""
        steps, run = [], 0
        for from_draft in self.from_draft:
            if from_draft:
                run += 1
            else:
                steps.append(run)
                run = 0
        if run:
            steps.append(run)  # stopped (eos or max tokens) inside a step
        return steps

    def summary(self, speculative: bool) -> str:
        lines = [
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {self.generation_tokens} tokens, "
            f"{self.generation_tps:.3f} tokens-per-sec",
        ]
        if not speculative:
            lines.append("Speculation: none (no draft model): 1 token per target step")
            return "\n".join(f"[stats] {line}" for line in lines)
        accepted = self.accepted_per_step()
        n_accepted = sum(self.from_draft)
        if self.loop is not None:
            verify = []
            steps, drafted = self.loop.steps, self.loop.drafted
        else:
            verify = self.verify_calls()
            steps = len(verify) or len(accepted)
            drafted = sum(rows - 1 for rows, _ in verify)
        rate = n_accepted / drafted if drafted else 0.0
        lines.append(
            f"Speculation: {steps} steps, {drafted} drafted, {n_accepted} accepted "
            f"(acceptance rate {rate:.1%}), "
            f"{len(self.from_draft) / steps if steps else 0:.2f} tokens/step"
        )
        histogram = " ".join(
            f"{n}:{accepted.count(n)}" for n in range(max(accepted, default=0) + 1)
        )
        lines.append(f"Accepted drafts per step (drafts:steps): {histogram}")
        if verify:
            times = [1e3 * seconds for _, seconds in verify]
            rows = statistics.median(r for r, _ in verify)
            lines.append(
                f"Verify step: {statistics.mean(times):.2f} ms mean, "
                f"{statistics.median(times):.2f} ms median ({rows:g} rows)"
            )
        elif self.loop is not None and self.loop.steps:
            lines.append(
                f"Verify step: {1e3 * self.loop.mean_verify_time:.2f} ms mean "
                f"({self.loop.verify_rows / self.loop.steps:.2f} rows mean; "
                "timed by the MTP loop, which keeps no median)"
            )
        return "\n".join(f"[stats] {line}" for line in lines)


@contextlib.contextmanager
def timed_calls(model, calls: List[Tuple[int, float]]):
    """Time each forward pass of ``model`` (this instance only) synchronously.

    The model's class is swapped for a subclass whose __call__ waits for its
    inputs (the drafts), runs the original and waits for the logits.
    """
    cls = type(model)

    def __call__(self, inputs, *args, **kwargs):
        mx.eval(inputs)
        tic = time.perf_counter()
        out = cls.__call__(self, inputs, *args, **kwargs)
        mx.eval(out)
        calls.append((inputs.shape[-1], time.perf_counter() - tic))
        return out

    model.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
    try:
        yield
    finally:
        model.__class__ = cls
