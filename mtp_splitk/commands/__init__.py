# Copyright © 2026 mtp_splitk contributors

"""The ``mtp-splitk`` subcommands, one module each (``generate``, ``convert``,
``synthesize``, ``bench``), each with its ``setup_arg_parser()`` and
``main(argv)``; ``mtp_splitk.cli`` dispatches to them.

What they share: :class:`Parser` (argparse whose errors are one
:class:`UsageError` line, reported with exit status 2 by ``cli.main``),
:class:`DefaultsFormatter` (help naming the defaults) and
:func:`check_model_path` (with :func:`check_config`).
"""

import argparse
import json
import re
from pathlib import Path

PROG = "mtp-splitk"


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line (argparse prints the usage too)."""

    def error(self, message):
        command = self.prog.split()[1:]  # "mtp-splitk generate" -> ["generate"]
        raise UsageError(f"{' '.join(command)}: {message}" if command else message)

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            # Worded as the top-level parser worded it when it parsed every command.
            raise UsageError(f"unrecognized arguments: {' '.join(extras)}")
        return args


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that names each flag's default, unless its help already says it
    or there is none to name (a switch, or None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(value: str, flag: str) -> None:
    """A local model must be a directory with a readable config.json; anything
    that is not a local path but looks like ``org/name`` is left to mlx-lm (a
    Hub repository)."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {value}: not a model directory (no config.json)")
        check_config(path / "config.json", f"{flag} {value}")
    elif not _HF_REPO.match(value):
        raise UsageError(f"{flag} {value}: model directory not found")


def check_config(config: Path, where: str) -> None:
    """config.json must be a JSON object naming its ``model_type`` (mlx-lm's
    own messages name neither the file nor the problem's place)."""
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"{where}: {config} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: {config} is not UTF-8 text (byte {e.start})") from e
    if not isinstance(data, dict):
        raise UsageError(f"{where}: {config} holds a JSON {type(data).__name__}, not an object")
    if not isinstance(data.get("model_type"), str):
        raise UsageError(f'{where}: {config} has no "model_type" (the architecture mlx-lm loads)')
