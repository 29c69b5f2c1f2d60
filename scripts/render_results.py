# Copyright © 2026 mtp_splitk contributors

"""Render the README's results table from benchmarks/summary.json.

The table sits between the lines ``<!-- results:begin -->`` and
``<!-- results:end -->`` of README.md; everything else in the README is left as
it is. tests/test_readme.py fails when the two differ, so after changing
summary.json run

    python -m scripts.render_results            # rewrite the README's table
    python -m scripts.render_results --check    # exit status 1 if it is stale

Plain Python (no mlx), so it runs anywhere the repository is checked out.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "benchmarks" / "summary.json"
README = ROOT / "README.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


def format_value(entry: dict) -> str:
    """``0.82×`` for a ratio, ``26%`` for a fraction, ``2.84`` otherwise."""
    value, unit = entry["value"], entry.get("unit", "")
    if unit == "x":
        return f"{value:.2f}×"
    if unit == "fraction":
        return f"{value:.0%}"
    return f"{value:.2f}"


def render(summary: dict) -> str:
    """The markdown table of every figure, in summary.json's order."""
    lines = [
        "| figure | value | device | run, tree | record |",
        "|---|---|---|---|---|",
    ]
    for key, entry in summary["figures"].items():
        label = entry.get("label", key)
        if entry.get("note"):  # what the figure does not show on its own
            label += f" ({entry['note']})"
        label = label.replace("|", "\\|")
        source = entry["source"]
        short = source.removeprefix("benchmarks/")
        lines.append(
            f"| {label} | {format_value(entry)} | {entry['device']} "
            f"| {entry['run']}, {entry['commit']} | [`{short}`]({source}) |"
        )
    return "\n".join(lines) + "\n"


def split_block(text: str):
    """(before, table, after) around the marker lines; ValueError if they are missing."""
    start = text.find(BEGIN)
    end = text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the lines {BEGIN} and {END}, in that order")
    head = start + len(BEGIN) + 1  # the table starts on the line after the marker
    return text[:head], text[head:end], text[end:]


def replace_block(text: str, table: str) -> str:
    before, _, after = split_block(text)
    return before + table + after


def load_summary(path: Path = SUMMARY) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report a stale table")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = replace_block(text, render(load_summary()))
    if args.check:
        if new != text:
            print("README.md's results table differs from benchmarks/summary.json", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
