# Copyright © 2026 mtp_splitk contributors

"""The benchmarks' synthetic models (real shapes, random 4-bit weights),
each written once into a directory of the cache (:mod:`mtp_splitk.cache`)."""

import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from mlx.utils import tree_flatten

from .. import cache, synthetic
from ..synthetic.model import lazy_model

# name: (family, size, draft family, draft size); the drafts share their
# target's vocabulary.
MODELS = {
    "llama3-8b": ("llama", "llama3-8b", "llama", "llama3.2-1b"),
    "qwen3-30b-a3b": ("qwen3_moe", "qwen3-30b-a3b", "qwen3", "qwen3-0.6b"),
}
# An MTP model that fits the run: DeepSeek-V3's layout (MLA attention, MoE,
# one MTP block) at the "small" size, since its real shape (671B) does not.
MTP_MODEL = ("deepseek_v3", "small")


def default_root() -> Path:
    """Where the benchmarks' models go unless a run names a directory."""
    return cache.root() / "bench"


def _dir_name(family: str, size: str, mtp: bool) -> str:
    return f"{family}-{size}{'-mtp' if mtp else ''}-v{synthetic.FORMAT_VERSION}"


@lru_cache(maxsize=None)
def model_bytes(family: str, size: str, mtp: bool = False) -> int:
    """The bytes of the tensors a synthetic directory stores (4-bit g64),
    from the config alone (a lazy model: nothing is computed). An MTP head
    is counted as one more decoder layer."""
    config = synthetic.model_config(family, size)
    model, _ = lazy_model(config, synthetic.DEFAULT_QUANTIZATION)
    params = tree_flatten(model.parameters())
    total = sum(v.nbytes for _, v in params)
    if mtp:
        layers = [v.nbytes for k, v in params if ".layers." in k]
        total += sum(layers) // synthetic.text_config(config)["num_hidden_layers"]
    return total


def disk_bytes(name: str) -> int:
    """The disk a benchmark model of :data:`MODELS` takes, with its draft."""
    family, size, draft_family, draft_size = MODELS[name]
    return model_bytes(family, size) + model_bytes(draft_family, draft_size)


def human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_disk(root, specs: List[Tuple[str, str, bool]], stream=None) -> int:
    """Before writing the directories of ``specs`` (family, size, with MTP
    head) that ``root`` lacks: one line saying what they take and where, and
    a ValueError if the disk has not that much free. Returns the bytes."""
    root = Path(root)
    missing = [s for s in specs if not cache.is_built(root / _dir_name(*s))]
    need = sum(model_bytes(*s) for s in missing)
    if not missing:
        return 0
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    names = ", ".join(f"{f} {s}{' + MTP' if m else ''} ({human(model_bytes(f, s, m))})"
                      for f, s, m in missing)
    print(
        f"Writing synthetic models into {root}, ~{human(need)} in all ({human(free)} free): "
        f"{names}. They stay there for later runs (--model-dir picks another place).",
        file=stream or sys.stderr,
        flush=True,
    )
    if need > free:
        raise ValueError(
            f"not enough disk in {root} for the synthetic models: ~{human(need)} needed, "
            f"{human(free)} free (--model-dir picks another place)."
        )
    return need


def model_dir(
    root,
    family: str,
    size: str,
    mtp: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """A synthetic model directory under ``root``, written once."""
    name = _dir_name(family, size, mtp)

    def write(path):
        if mtp:
            synthetic.write_mtp_model(path, family, size, progress=progress)
        else:
            synthetic.write_model(path, family, size, progress=progress)

    return cache.build_once(Path(root) / name, write)


def smoke_pair(root) -> Tuple[Path, Path]:
    """A tiny (target, draft) pair under ``root``, written once."""
    path = cache.build_once(
        Path(root) / f"smoke-v{synthetic.FORMAT_VERSION}",
        synthetic.write_pair,
        marker="draft/config.json",
    )
    return path / "target", path / "draft"


def model_specs() -> List[Tuple[str, str, bool]]:
    """(family, size, with MTP head) of every directory a full run reads."""
    specs = []
    for family, size, draft_family, draft_size in MODELS.values():
        specs += [(family, size, False), (draft_family, draft_size, False)]
    return specs + [(*MTP_MODEL, True)]
