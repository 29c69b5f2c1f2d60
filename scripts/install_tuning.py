#!/usr/bin/env python3
"""Install a GPU's measured tuning table for the planner.

Merges <kernels_dir>/<device>.json (scripts/bench_kernels.py --tune: splits
and dense M ranges) with <moe_dir>/<device>_moe.json (scripts/bench_moe.py
--tune: MoE pair ranges, split and depth), if present (else the installed table's
MoE entries stay), into mtp_splitk/tuning/<device>.json.
Usage: python -m scripts.install_tuning DEVICE_KEY KERNELS_DIR [MOE_DIR]
"""
import json
import os
import sys

MOE_KEYS = ("moe_p_range", "moe_glu_p_range", "moe_warps_k", "moe_depth")
TUNING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtp_splitk", "tuning")


def main(key, kernels_dir, moe_dir=None):
    dense = os.path.join(kernels_dir, f"{key}.json")
    if not os.path.exists(dense):
        committed = os.path.join(TUNING, f"{key}.json")
        keeps = f"the committed {committed}" if os.path.exists(committed) else "no table: every call stays on MLX"
        print(f"no {dense}: nothing installed; the planner keeps {keeps}")
        return 1
    table = json.load(open(dense))
    moe = os.path.join(moe_dir, f"{key}_moe.json") if moe_dir else None
    path = os.path.join(TUNING, f"{key}.json")
    # The MoE entries from this run's bench_moe, else (no MoE run this time) the installed table's.
    source = moe if moe and os.path.exists(moe) else path if os.path.exists(path) else None
    if source:
        given = json.load(open(source))
        table.update({name: given[name] for name in MOE_KEYS if name in given})
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    print(f"installed {path}: m_range {table['m_range']}, moe_p_range {table.get('moe_p_range')}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
