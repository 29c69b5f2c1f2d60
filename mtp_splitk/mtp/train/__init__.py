# Copyright © 2026 mtp_splitk contributors

"""Train an MTP head for a target that has none, by self-distillation.

:func:`train` (``mtp-splitk train-mtp``) has the target write its own text
from combinatorial seed prompts (:mod:`.prompts`, :mod:`.data`), fits a
one-block head in DeepSeek-V3's layout to the target's own next-next-token
distributions (:mod:`.objective`), reports the held-out acceptance greedy
speculative decoding will see (:mod:`.evaluate`) and writes the head where
:func:`mtp_splitk.mtp.load` finds it (:mod:`.export`).
"""

from .config import TrainConfig
from .evaluate import acceptance
from .objective import build_head, step_loss
from .trainer import train

__all__ = ["TrainConfig", "acceptance", "build_head", "step_loss", "train"]
