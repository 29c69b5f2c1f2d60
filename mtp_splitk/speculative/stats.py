# Copyright © 2026 mtp_splitk contributors

"""What a speculative generation counts and times (:class:`Stats`)."""

from collections import Counter
from dataclasses import dataclass, field
from typing import List


@dataclass
class Stats:
    """Counters and timings of one speculative generation.

    Times are in seconds. ``verify_time`` is synchronised: the drafts are
    complete when each verify pass is submitted and it ends when its verdict
    is on the host, so it measures the target's ``M = k+1`` forward alone.
    The overlapped loop never waits for a verdict, so it does not measure it
    (``overlapped`` is then True and ``verify_time`` stays 0).
    """

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    #: Drafts the target judged and rejected (at most one per step).
    rejected: int = 0
    verify_time: float = 0.0
    #: Rows through the target in verify passes, replayed rows included.
    verify_rows: int = 0
    accepted_per_step: List[int] = field(default_factory=list)
    #: The overlapped loop ran (no host sync per step), else the synchronous one.
    overlapped: bool = False
    #: Why the synchronous loop ran where the overlapped one was asked for.
    overlap_off: str = ""
    #: The overlapped loop's host time, summed over steps: building a step's
    #: graph in Python, submitting it (``mx.async_eval``: MLX encodes and
    #: launches its kernels there) and waiting for the step before it to be
    #: read. A loop that waits ~0 is host-bound: its step is the first two.
    build_time: float = 0.0
    submit_time: float = 0.0
    wait_time: float = 0.0
    #: Steps whose target part ran through mx.compile (``compile_step``).
    compiled_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """Accepted / judged: the probability a draft is accepted given that
        the drafts before it were (Leviathan et al.'s alpha). Drafts after
        the first rejection of a step are never judged."""
        judged = self.accepted + self.rejected
        return self.accepted / judged if judged else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generation_tokens / self.steps if self.steps else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        if not self.generation_time:
            return 0.0
        return self.generation_tokens / self.generation_time

    @property
    def mean_verify_time(self) -> float:
        return self.verify_time / self.steps if self.steps else 0.0

    def host_split_ms(self) -> dict:
        """The overlapped loop's host time a step, ms: build, submit, wait."""
        n = self.steps or 1
        return {"build_ms": 1e3 * self.build_time / n, "submit_ms": 1e3 * self.submit_time / n,
                "wait_ms": 1e3 * self.wait_time / n}

    def record_step(self, drafted: int, accepted: int, rows: int):
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejected += accepted < drafted
        self.accepted_per_step.append(accepted)
        self.verify_rows += rows

    def accepted_histogram(self) -> Counter:
        """Accepted drafts per step -> number of steps."""
        return Counter(self.accepted_per_step)

    def summary(self) -> str:
        return (
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {self.generation_tokens} tokens, "
            f"{self.generation_tps:.3f} tokens-per-sec\n"
            f"Speculation: {self.steps} steps, {self.drafted} drafted, "
            f"{self.accepted} accepted ({self.acceptance_rate:.1%}; per token "
            f"{self.per_token_acceptance:.1%}), {self.tokens_per_step:.2f} tokens/step, "
            + (
                "overlapped loop (verify time not measured; host a step: build {build_ms:.2f}, "
                "submit {submit_ms:.2f}, wait {wait_ms:.2f} ms)".format(**self.host_split_ms())
                if self.overlapped
                else f"verify {1e3 * self.mean_verify_time:.2f} ms/step"
            )
        )
