# Copyright © 2026 mtp_splitk contributors

"""The README's results table and benchmarks/summary.json cannot drift apart,
every headline figure names where it came from, and each figure that can be
recomputed from its committed record is recomputed here."""

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_renderer():
    # By path: scripts/ is a directory of tools, not an installed package.
    spec = importlib.util.spec_from_file_location(
        "render_results", ROOT / "scripts" / "render_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_results = _load_renderer()
SUMMARY = render_results.load_summary()
FIGURES = SUMMARY["figures"]


def _source(entry):
    with open(ROOT / entry["source"], encoding="utf-8") as f:
        return json.load(f)


def test_readme_table_is_rendered_from_summary():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    _, table, _ = render_results.split_block(readme)
    assert table == render_results.render(SUMMARY), (
        "README.md's results table is stale: run `python -m scripts.render_results`"
    )


def test_a_changed_figure_changes_the_table():
    changed = copy.deepcopy(SUMMARY)
    key = next(iter(changed["figures"]))
    changed["figures"][key]["value"] += 0.5
    assert render_results.render(changed) != render_results.render(SUMMARY)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    current = render_results.replace_block(readme, render_results.render(SUMMARY))
    rewritten = render_results.replace_block(current, render_results.render(changed))
    assert rewritten != current
    assert render_results.replace_block(rewritten, render_results.render(SUMMARY)) == current


def test_replace_block_needs_both_markers():
    with pytest.raises(ValueError):
        render_results.replace_block("no markers here\n", "| table |\n")


@pytest.mark.parametrize("key", list(FIGURES))
def test_every_figure_names_its_provenance(key):
    entry = FIGURES[key]
    value = entry["value"]
    assert isinstance(value, (int, float)) and not isinstance(value, bool)
    for field in ("device", "commit", "date", "command", "source", "run"):
        assert isinstance(entry.get(field), str) and entry[field].strip(), field
    assert re.fullmatch(r"[0-9a-f]{7,40}", entry["commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", entry["date"])
    assert entry["unit"] in ("x", "fraction", "")
    assert (ROOT / entry["source"]).is_file(), entry["source"]
    assert entry["device"] in json.dumps(_source(entry)), "the record names another device"


# -- the figures recomputed from their records ------------------------------------------------

_E2E = re.compile(
    r"^(?P<model>[^.]+)\.(?P<setting>plain|spec_k(?P<k>\d+)_p(?P<p>[\d.]+?))\.(?P<metric>\w+)$"
)


def _e2e(key, data):
    """An end-to-end figure, ``<model>.<plain|spec_kK_pP>.<metric>``, from bench_e2e.json."""
    m = _E2E.match(key)
    assert m, f"no derivation for {key}: add one to tests/test_readme.py"
    model = data["models"][m["model"]]
    mlx_plain = model["plain"]["mlx"]["tps"]
    if m["setting"] == "plain":
        assert m["metric"] == "patched_over_mlx"
        return model["plain"]["patched"]["tps"] / mlx_plain
    run = f"p={m['p']} k={m['k']}"
    runs = model["acceptance"]
    # Since run 10 a run's key ends with its loop ("overlap", "compiled" or "sync"); the
    # headline is each side's default: the overlapped loop, its step compiled when patched (run 15).
    loop = " overlap" if f"patched {run} overlap" in runs else ""
    compiled = " compiled" if f"patched {run} compiled" in runs else loop
    patched = runs[f"patched {run}{compiled}"]
    # Unpatched, the uncompiled overlapped loop (its default) where the record has it, else
    # the compiled one (run 17's records; run 16's have neither: their figures are run 15's).
    unpatched = runs.get(f"mlx {run}{loop}") or runs.get(f"mlx {run}{compiled}", {})
    # A loop that parted from its own p = 1 reference ran at another acceptance
    # (run 12b's slotted cache): no headline comes from such a run.
    assert all(r.get("matches_reference", True) for r in (patched, unpatched)), f"{key}: not as recorded"
    if m["metric"] == "patched_over_mlx_plain":
        return patched["tps"] / mlx_plain
    if m["metric"] == "unpatched_over_mlx_plain":
        return unpatched["tps"] / mlx_plain
    if m["metric"] == "patched_over_unpatched_loop":
        return patched["tps"] / unpatched["tps"]
    if m["metric"] == "tokens_per_step":
        return patched["tokens_per_step"]
    if m["metric"] == "async_over_sync":
        return patched["tps"] / runs[f"patched {run} sync"]["tps"]
    if m["metric"] == "matmul_calls_on_kernel_fraction":
        calls = patched["matmuls"]
        return calls["splitk"] / (calls["splitk"] + calls["mlx"])
    raise AssertionError(f"no derivation for {key}: add one to tests/test_readme.py")


def _qwen3_next_mtp_k3(data):
    """The MTP head steered to p = 0.8 at k = 3, overlapped loop patched (compiled, the
    hybrids' default since run 18, where the record has it), over MLX plain decode, on the
    Qwen3-Next-80B-A3B model the record holds (runs 17, 18: its 12-layer cut)."""
    (model,) = [m for name, m in data["models"].items() if name.startswith("qwen3-next-80b-a3b")]
    runs = model["mtp"]
    run = runs.get("patched mtp p=0.8 k=3 compiled") or runs["patched mtp p=0.8 k=3 overlap"]
    assert run.get("matches_reference", True) and run["overlapped"]
    return run["tps"] / model["plain"]["mlx"]["tps"]


def _chain_min_m2_4(data):
    return min(r["chain_mlx"] / r["chain_ours"] for r in data["rows"] if r["M"] in (2, 4))


def _hbm_min_m1_16(data):
    rows = data["rows"]
    big = [r for r in rows if r["weight_bytes"] >= 16 * 2**20 and r["M"] <= 16]
    return min(r["pct_copy_bw"] for r in big) / 100


def _t16_over_t1_max(data):
    t = {(r["N"], r["K"], r["M"]): r["us_ours"] for r in data["rows"]}
    return max(t[(n, k, 16)] / t[(n, k, 1)] for n, k, m in t if m == 1)


def _moe_min_m8_17(data):
    return min(r["speedup"] for r in data["rows"] if 8 <= r["M"] <= 17)


def _moe_glu_min_m2_17(data):
    return min(r["us_glu_mlx"] / r["us_glu_ours"] for r in data["rows"] if "us_glu_ours" in r and 2 <= r["M"] <= 17)


def _moe_m1_where_planned(data):
    from mtp_splitk import plan as planner

    ranges = planner.load_tuning("NVIDIA H200")["moe_p_range"]

    def planned(r):
        lo, hi = ranges.get(f"affine4:{r['E'] * r['N']}x{r['K']}", (0, 0))
        return lo <= r["pairs"] <= hi

    return min(r["speedup"] for r in data["rows"] if r["M"] == 1 and planned(r))


def _first_draft_acceptance(data):
    return data["eval"]["accept"][0]


DERIVED = {
    "smollm2-135m.mtp_head.first_draft_acceptance": _first_draft_acceptance,
    "dense.chain_mlx_over_ours.min_m2_4": _chain_min_m2_4,
    "dense.hbm_fraction.min_m1_16": _hbm_min_m1_16,
    "dense.t16_over_t1.max": _t16_over_t1_max,
    "moe.vs_mlx.min_m8_17": _moe_min_m8_17,
    "moe.switch_glu_fused_vs_mlx.min_m2_17": _moe_glu_min_m2_17,
    "moe.vs_mlx.m1": _moe_m1_where_planned,
    "qwen3-next-80b-a3b.mtp_k3_p0.8.patched_over_mlx_plain": _qwen3_next_mtp_k3,
}


@pytest.mark.parametrize("key", list(FIGURES))
def test_every_figure_is_its_record_rounded(key):
    entry = FIGURES[key]
    data = _source(entry)
    derive = DERIVED.get(key)
    measured = derive(data) if derive else _e2e(key, data)
    assert round(measured, 2) == pytest.approx(entry["value"], abs=1e-9), (key, measured)
