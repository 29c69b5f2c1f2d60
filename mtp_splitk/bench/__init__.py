# Copyright © 2026 mtp_splitk contributors

"""Benchmark tooling: harnesses and the drafters they drive."""
