#!/usr/bin/env python3
"""End-to-end tokens/s of plain and speculative decoding, unpatched vs patched.

The same as `mtp-splitk bench e2e`; see mtp_splitk/bench/e2e.py for the
method. Examples:
    python -m scripts.bench_e2e --out benchmarks/e2e               # the GPU run
    python -m scripts.bench_e2e --smoke --out /tmp/e2e --repeats 1  # CPU check
"""
import sys

from mtp_splitk import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "e2e", *sys.argv[1:]]))
