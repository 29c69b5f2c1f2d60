# Copyright © 2026 mtp_splitk contributors

"""Split-K small-M quantized matmuls and MTP speculative decoding for mlx-lm."""

from .ops import gather_qmm, quantized_matmul
from .plan import set_split

__version__ = "0.1.0"
