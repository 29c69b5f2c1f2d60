# Copyright © 2026 mtp_splitk contributors

"""What the CLI tests share: ``mtp-splitk`` in a subprocess, its error and
--stats lines, the token ids it generated, and a cache with the demo pair."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_splitk import cache as model_cache
from mtp_splitk.commands import generate

REPO = Path(__file__).resolve().parents[1]


# The CLI with mlx-lm's stream_generate wrapped to print each token id on
# stderr, so a test compares tokens, not only the text they decode to.
RECORD_TOKENS = """
import importlib, sys
from mtp_splitk import cli
generate = importlib.import_module("mlx_lm.generate")
inner = generate.stream_generate
def stream_generate(*args, **kwargs):
    for response in inner(*args, **kwargs):
        print("[token]", response.token, file=sys.stderr)
        yield response
generate.stream_generate = stream_generate
sys.exit(cli.main(sys.argv[1:]))
"""


def run(*args, cache, code=None):
    """``mtp-splitk ARGS`` in a subprocess (``code``: a script run with ARGS instead)."""
    # Offline: without --model the command falls back to the synthetic demo
    # pair (tests/test_real_model.py runs the real one).
    env = dict(os.environ, MTP_SPLITK_CACHE=str(cache), MTP_SPLITK_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("MTP_SPLITK", None)
    program = ["-m", "mtp_splitk.cli"] if code is None else ["-c", code]
    return subprocess.run(
        [sys.executable, *program, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(stderr):
    # transformers may warn about unknown model types on stderr; ours is the last line
    return [l for l in stderr.splitlines() if l.startswith("mtp-splitk: error:")]


def tokens(result):
    """The token ids a RECORD_TOKENS run generated."""
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    return [int(l.split()[1]) for l in lines if l.startswith("[token] ")]


def stats_lines(stderr):
    """--stats' lines (on stderr) as {"Speculation": "...", ...}."""
    return dict(
        line[len("[stats] ") :].split(": ", 1)
        for line in stderr.splitlines()
        if line.startswith("[stats] ")
    )


def histogram(stats):
    """{accepted drafts: steps} of --stats' histogram line."""
    line = next(v for k, v in stats.items() if k.startswith("Steps by drafts accepted"))
    return {int(a): int(n) for a, n in (pair.split(":") for pair in line.split())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache with the default pair already built (the first-run test builds its own)."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get(model_cache.ENV)
    os.environ[model_cache.ENV] = str(path)
    try:
        generate.default_models()
    finally:
        if old is None:
            del os.environ[model_cache.ENV]
        else:
            os.environ[model_cache.ENV] = old
    return path


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv(model_cache.ENV, str(cache))
    monkeypatch.setenv("MTP_SPLITK_OFFLINE", "1")
    return cache
