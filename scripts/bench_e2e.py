#!/usr/bin/env python3
"""End-to-end tokens/s of plain and speculative decoding, unpatched vs patched.

The same as `mtp-splitk bench e2e`; see mtp_splitk/bench_e2e.py for the
method. Examples:
    python scripts/bench_e2e.py --out benchmarks/e2e               # the GPU run
    python scripts/bench_e2e.py --smoke --out /tmp/e2e --repeats 1  # CPU check
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtp_splitk import bench_e2e  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_e2e.add_arguments(parser)
    bench_e2e.run(parser.parse_args())
