# Copyright © 2026 mtp_splitk contributors

"""The write-once directory cache: synthetic models built on first use.

The demo models of ``mtp-splitk generate`` and the benchmarks' models live
under :func:`root` (``$MTP_SPLITK_CACHE``; by default ``mtp_splitk`` in
``$XDG_CACHE_HOME`` or ``~/.cache``). :func:`build_once` writes a directory
into a temporary sibling and renames it into place, so an interrupted build
leaves nothing behind and concurrent builders (ranks of one host, parallel
writers) never see half a directory. A marker file the writer creates (e.g.
``config.json``) says the directory is complete.

This module imports nothing of the package: any layer may use it.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

ENV = "MTP_SPLITK_CACHE"


def root() -> Path:
    """The cache directory (not created here)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtp_splitk"


def digest(*parts) -> str:
    """A short name suffix for the versions that decide a directory's bytes,
    so that an upgrade builds afresh instead of reading a stale directory."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12]


def is_built(path, marker: str = "config.json") -> bool:
    return (Path(path) / marker).exists()


def build_once(path, write: Callable[[Path], object], marker: str = "config.json") -> Path:
    """``path``, written by ``write(tmp)`` into a temporary directory beside it
    and renamed into place, unless ``path/marker`` already exists."""
    final = Path(path)
    if is_built(final, marker):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        write(work)
        if not (work / marker).exists():
            raise RuntimeError(f"building {final}: the writer made no {marker}")
        try:
            os.rename(work, final)
        except OSError:
            if not is_built(final, marker):
                raise  # not the "another process was faster" case
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
