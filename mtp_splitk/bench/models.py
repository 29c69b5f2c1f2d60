# Copyright © 2026 mtp_splitk contributors

"""The benchmarks' synthetic models (real shapes, random affine g64 weights,
4-bit unless a model says otherwise), each written once into a directory of
the cache (:mod:`mtp_splitk.cache`)."""

import shutil
import sys
from functools import lru_cache
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
# Models with an MTP head, by name (e2e's --mtp-model): (family, size, bits).
# Qwen3-Next-80B-A3B at full depth is 56 GB at 5 bits with its head, more than
# the GPU machine's 64 GiB disk holds next to anything else; its 12-layer cut
# (the same layers and widths, 15 GB) is the one to run there.
MTP_MODELS = {
    "-".join(MTP_MODEL): (*MTP_MODEL, 4),
    "qwen3_next-tiny": ("qwen3_next", "tiny", 4),  # the smoke's
    "qwen3-next-80b-a3b-12l": ("qwen3_next", "qwen3-next-80b-a3b-12l", 5),  # the users' 5 bits
    "qwen3-next-80b-a3b-12l-4bit": ("qwen3_next", "qwen3-next-80b-a3b-12l", 4),
    "qwen3-next-80b-a3b": ("qwen3_next", "qwen3-next-80b-a3b", 5),
    "qwen3-next-80b-a3b-4bit": ("qwen3_next", "qwen3-next-80b-a3b", 4),
}


def quantization(bits: int = 4) -> dict:
    """The benchmarks' quantization: affine, group size 64, ``bits`` bits."""
    return dict(synthetic.DEFAULT_QUANTIZATION, bits=bits)


def default_root() -> Path:
    """Where the benchmarks' models go unless a run names a directory."""
    return cache.root() / "bench"


def _dir_name(family: str, size: str, mtp: bool, bits: int = 4) -> str:
    quantized = "" if bits == 4 else f"-{bits}bit"
    return f"{family}-{size}{quantized}{'-mtp' if mtp else ''}-v{synthetic.FORMAT_VERSION}"


def _label(family: str, size: str, mtp: bool, bits: int = 4) -> str:
    return f"{family} {size}{'' if bits == 4 else f' {bits}-bit'}{' + MTP' if mtp else ''}"


@lru_cache(maxsize=None)
def model_bytes(family: str, size: str, mtp: bool = False, bits: int = 4) -> int:
    """The bytes of the tensors a synthetic directory stores (affine g64,
    ``bits`` bits, the MTP head included with ``mtp``), from the config alone
    (lazy shapes: nothing is computed)."""
    return synthetic.footprint(family, size, quantization(bits), mtp)["bytes"]


def disk_bytes(name: str) -> int:
    """The disk a benchmark model of :data:`MODELS` takes, with its draft."""
    family, size, draft_family, draft_size = MODELS[name]
    return model_bytes(family, size) + model_bytes(draft_family, draft_size)


def human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_disk(root, specs: List[Tuple], stream=None) -> int:
    """Before writing the directories of ``specs`` (family, size, with MTP
    head[, bits]) that ``root`` lacks: one line saying what they take and
    where, and a ValueError if the disk has not that much free. Returns the
    bytes."""
    root = Path(root)
    missing = [s for s in specs if not cache.is_built(root / _dir_name(*s))]
    need = sum(model_bytes(*s) for s in missing)
    if not missing:
        return 0
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    names = ", ".join(f"{_label(*s)} ({human(model_bytes(*s))})" for s in missing)
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


def dir_path(root, family: str, size: str, mtp: bool = False, bits: int = 4) -> Path:
    """Where :func:`model_dir` puts that model (complete once it holds config.json)."""
    return Path(root) / _dir_name(family, size, mtp, bits)


def model_dir(
    root,
    family: str,
    size: str,
    mtp: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    bits: int = 4,
) -> Path:
    """A synthetic model directory under ``root`` (``bits``-bit affine g64),
    written once."""
    write_model = synthetic.write_mtp_model if mtp else synthetic.write_model

    def write(path):
        write_model(path, family, size, quantization(bits), progress=progress)

    return cache.build_once(dir_path(root, family, size, mtp, bits), write)


def mtp_model_dir(root, name: str, progress=None) -> Path:
    """The directory of the MTP model ``name`` of :data:`MTP_MODELS`, written once."""
    family, size, bits = MTP_MODELS[name]
    return model_dir(root, family, size, mtp=True, progress=progress, bits=bits)


def mtp_spec(name: str) -> Tuple[str, str, bool, int]:
    """(family, size, with MTP head, bits) of MTP model ``name``, for :func:`check_disk`."""
    family, size, bits = MTP_MODELS[name]
    return family, size, True, bits


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
