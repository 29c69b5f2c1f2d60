# Copyright © 2026 mtp_splitk contributors

"""What ``mtp-splitk generate --stats`` observes and prints (on stderr)."""

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class Recorder:
    """What ``--stats`` observes of one mlx-lm generation.

    ``from_draft`` and the token counts come from mlx-lm's responses (what
    was handed out). With speculation, ``loop`` is the loop's own
    ``speculative.Stats``: the steps, the drafts the target judged, the
    accepted drafts per step, which loop ran, and (synchronous loop) the
    verify time, each verify pass waited for, so it times the target's
    forward alone.
    """

    from_draft: List[bool] = field(default_factory=list)
    loop: Optional[Any] = None  # mtp_splitk.speculative.Stats, when speculating
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

    def summary(self, header: List[str], num_draft_tokens: int = 0) -> str:
        """The lines, each ``[stats] ``-prefixed: ``header`` (target, drafter),
        then the loop, tokens/s, speculation, the histogram of accepted drafts
        per step over 0..k and the verify step."""
        lines = list(header)
        loop = self.loop
        if loop is not None:
            if loop.overlapped:
                compiled = ", compiled (mx.compile)" if loop.compiled_steps else ""
                lines.append(
                    f"Loop: overlapped{compiled} (step n+1 is queued before step n's verdict is read)"
                )
            elif loop.overlap_off:
                lines.append(
                    f"Loop: synchronous (the overlapped loop cannot run: {loop.overlap_off})"
                )
            else:
                lines.append("Loop: synchronous (--no-overlap)")
        lines += [
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {self.generation_tokens} tokens, "
            f"{self.generation_tps:.3f} tokens-per-sec",
        ]
        if loop is None:
            lines.append("Speculation: none (no draft model): 1 token per target step")
            return "\n".join(f"[stats] {line}" for line in lines)
        steps = loop.steps
        lines.append(
            f"Speculation: {steps} steps, {loop.drafted} drafted, {loop.accepted} accepted "
            f"(acceptance rate {loop.acceptance_rate:.1%}), "
            f"{len(self.from_draft) / steps if steps else 0:.2f} tokens/step"
        )
        # Every bucket from 0 to k, so a 0 says no step accepted that many.
        k = max([num_draft_tokens, *loop.accepted_per_step])
        counts = loop.accepted_histogram()
        histogram = " ".join(f"{n}:{counts.get(n, 0)}" for n in range(k + 1))
        lines.append(
            f"Steps by drafts accepted (accepted:steps, every count 0..k={k}): {histogram}"
        )
        if loop.overlapped:
            lines.append("Verify step: not timed (the overlapped loop never waits for one)")
        elif steps:
            lines.append(
                f"Verify step: {1e3 * loop.mean_verify_time:.2f} ms mean over {steps} target "
                f"passes of {loop.verify_rows / steps:.2f} rows mean (a pass verifies the last "
                "token and its drafts; hybrid models replay accepted rows too)"
            )
        return "\n".join(f"[stats] {line}" for line in lines)
