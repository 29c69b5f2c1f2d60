# Copyright © 2026 mtp_splitk contributors

"""What both backends' launchers share: the kernel sources, names, inputs
and a plan's compile-time constants."""

import hashlib
import os
from functools import lru_cache

from ..plan import Plan

MODE_IDS = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}
_CORE = "quant_core.h"


def kernel_dir() -> str:
    # Installed wheels carry kernels/ as the package mtp_splitk.kernels; a
    # checkout on PYTHONPATH has it beside the package.
    try:
        from importlib.resources import files

        path = str(files("mtp_splitk.kernels"))
        if os.path.exists(os.path.join(path, _CORE)):
            return path
    except ModuleNotFoundError:
        pass
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(package), "kernels")


@lru_cache(maxsize=None)
def read_source(name: str) -> str:
    """A kernel file with ``#include "quant_core.h"`` expanded (JIT compilers
    see no include path of ours)."""
    directory = kernel_dir()
    with open(os.path.join(directory, name)) as f:
        text = f.read()
    with open(os.path.join(directory, _CORE)) as f:
        core = f.read()
    return _strip_comments(text.replace(f'#include "{_CORE}"', core))


def _strip_comments(source: str) -> str:
    """Drop // comments and blank lines: MLX rebuilds and hashes the kernel
    source on every call, so its length is per-call host time."""
    lines = []
    for line in source.splitlines():
        code = (line.split("//", 1)[0] if "//" in line else line).strip()
        if code:
            lines.append(code)
    return "\n".join(lines) + "\n"


def kernel_name(kind: str, affine: bool, header: str, source: str) -> str:
    """A name that changes with the kernel's text. MLX's CUDA backend caches
    compiled kernels on disk by name alone (in $MLX_PTX_CACHE_DIR, else
    <tmp>/mlx/<version>/ptx), so a fixed name would run the previous
    version's binary after an upgrade of this package."""
    digest = hashlib.sha1((header + source).encode()).hexdigest()[:10]
    return f"mtp_splitk_{kind}_{'affine' if affine else 'fp'}_{digest}"


def input_names(affine: bool, gather: bool):
    """The kernels' inputs, on both backends: the fp modes have no biases."""
    names = ["x", "w", "scales", "biases"] if affine else ["x", "w", "scales"]
    return names + ["idx"] if gather else names


def multi_input_names(affine: bool, count: int):
    """A fused launch's inputs: x, then each weight's w, scales (and biases)
    suffixed with its index."""
    names = ["x"]
    for i in range(count):
        names += [f"w{i}", f"scales{i}"] + ([f"biases{i}"] if affine else [])
    return names


def template(plan: Plan, dtype, scales_dtype):
    affine = plan.mode == "affine"
    return [
        ("T", dtype),
        ("TS", scales_dtype),
        ("MODE", MODE_IDS[plan.mode]),
        ("BITS", plan.bits),
        ("G", plan.group_size),
        ("WK", plan.warps_k),
        ("NT", plan.token_tiles),
        ("RT", plan.row_tiles),
        ("FAST4", affine and plan.bits == 4 and scales_dtype == dtype),
        ("DEPTH", plan.depth),
    ]


def shared_memory(plan: Plan) -> int:
    # Partial tiles of the fixed-order reduction: [WK][NT][RT][32 lanes] float4.
    return plan.warps_k * plan.token_tiles * plan.row_tiles * 32 * 16


