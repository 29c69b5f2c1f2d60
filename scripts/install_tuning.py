#!/usr/bin/env python3
"""Install a GPU's measured tuning table for the planner.

Merges <kernels_dir>/<device>.json (scripts/bench_kernels.py --tune: splits
and dense M ranges) with <moe_dir>/<device>_moe.json (scripts/bench_moe.py
--tune: MoE pair ranges, split and depth, per expert shape; the installed table's
entries stay for shapes it did not measure) into mtp_splitk/tuning/<device>.json; an
MoE run alone updates the installed table's MoE entries.
Usage: python -m scripts.install_tuning DEVICE_KEY KERNELS_DIR [MOE_DIR]
"""
import json
import os
import sys

MOE_KEYS = ("moe_p_range", "moe_glu_p_range", "moe_warps_k", "moe_depth")
TUNING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtp_splitk", "tuning")


def main(key, kernels_dir, moe_dir=None):
    path = os.path.join(TUNING, f"{key}.json")
    dense = os.path.join(kernels_dir, f"{key}.json")
    moe = os.path.join(moe_dir, f"{key}_moe.json") if moe_dir else None
    have_moe = moe is not None and os.path.exists(moe)
    if os.path.exists(dense):
        table = json.load(open(dense))
        # The MoE entries of the installed table stay unless this run measured them.
        installed = json.load(open(path)) if os.path.exists(path) else {}
        table.update({name: installed[name] for name in MOE_KEYS if name in installed})
    elif have_moe and os.path.exists(path):
        table = json.load(open(path))  # an MoE run alone: the installed table's dense entries stay
    else:
        committed = f"the committed {path}" if os.path.exists(path) else "no table: every call stays on MLX"
        print(f"no {dense}: nothing installed; the planner keeps {committed}")
        return 1
    if have_moe:
        # Per expert shape: a run of some shapes (bench_moe --shapes) keeps the others' entries.
        given = json.load(open(moe))
        for name in MOE_KEYS:
            if name in given:
                table[name] = {**table.get(name, {}), **given[name]}
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    print(f"installed {path}: m_range {table['m_range']}, moe_p_range {table.get('moe_p_range')}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
