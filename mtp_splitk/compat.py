# Copyright © 2026 mtp_splitk contributors

"""The one place that reaches into mlx-lm's private names.

An mlx-lm release that renames one breaks this module alone, and its tests.
"""

from mlx_lm.models.cache import _BaseCache
from mlx_lm.utils import _get_classes

#: The base class of mlx-lm's caches (defaults for state, trim, ...).
BaseCache = _BaseCache


def get_classes(config: dict):
    """``(Model, ModelArgs)`` of the mlx-lm module for ``config["model_type"]``."""
    return _get_classes(config)
