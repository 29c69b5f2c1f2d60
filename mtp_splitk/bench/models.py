# Copyright © 2026 mtp_splitk contributors

"""The benchmarks' synthetic models (real shapes, random 4-bit weights),
each written once into a directory of the cache (:mod:`mtp_splitk.cache`)."""

from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .. import cache, synthetic

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


def model_dir(
    root,
    family: str,
    size: str,
    mtp: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """A synthetic model directory under ``root``, written once."""
    name = f"{family}-{size}{'-mtp' if mtp else ''}-v{synthetic.FORMAT_VERSION}"

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
