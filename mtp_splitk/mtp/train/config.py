# Copyright © 2026 mtp_splitk contributors

"""The knobs of a training run (the ``mtp-splitk train-mtp`` flags)."""

from dataclasses import dataclass
from typing import Optional


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
    batch_size: int = 32  # sequences per training step
    steps: int = 2000
    lr: float = 5e-4
    warmup: int = 50
    minutes: Optional[float] = None  # wall-clock budget of this run, all phases
    gen_fraction: float = 0.5  # of the budget, at most, for generating text
    depth: int = 2  # unrolled head steps in the loss
    top_k: int = 64  # teacher top-k, cached once (0: whole vocabulary, every step)
    hidden_weight: float = 1.0
    init: str = "identity"
    init_from: Optional[str] = None  # a model directory whose trained head to start from
    log_every: int = 20
    save_every: int = 200
    stop_after: Optional[int] = None  # steps in this run, then checkpoint
    seed: int = 0
