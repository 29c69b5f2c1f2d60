"""Planner decisions (pure Python, no GPU needed)."""

import mlx.core as mx
import pytest

from mtp_splitk import plan as planner

H100 = planner.Device("cuda", "NVIDIA H100 80GB HBM3", 132)
H200 = planner.Device("cuda", "NVIDIA H200", 132)
CPU = planner.Device("cpu", "cpu", 0)
TABLE = planner.load_tuning(H100.name)


def test_committed_h100_table_is_found_and_well_formed():
    assert TABLE, "tuning/nvidia_h100_80gb_hbm3.json should be committed"
    for key, (lo, hi) in TABLE["m_range"].items():
        assert 0 <= lo <= hi <= 64, key
    for shape, wk in TABLE["warps_k"].items():
        assert wk in planner.WARP_CHOICES, shape


def test_cpu_never_plans():
    assert planner.plan_dense(1, 4096, 4096, 4, 64, "affine", mx.bfloat16, device=CPU) is None


@pytest.mark.parametrize("M", [2, 5, 6])
def test_measured_winning_range_takes_the_kernel(M):
    plan = planner.plan_dense(M, 14336, 4096, 4, 64, "affine", mx.bfloat16, device=H100)
    assert plan is not None and plan.warps_k == TABLE["warps_k"]["14336x4096"]


@pytest.mark.parametrize("M", [1, 8, 16, 65, 1000])
def test_outside_the_range_goes_to_mlx(M):
    # M = 1 measured 1.02x MLX on the H100: under plan.MIN_SPEEDUP.
    assert planner.plan_dense(M, 14336, 4096, 4, 64, "affine", mx.bfloat16, device=H100) is None


def test_split_never_depends_on_m():
    """Batch invariance: the split (and so the arithmetic) is a function of the shape."""
    planner.set_split(None)
    try:
        for N, K in [(4096, 4096), (14336, 4096), (1000, 544), (151936, 2048)]:
            planner.set_split(4)  # force the kernel for every M to compare plans
            plans = [planner.plan_dense(M, N, K, 4, 64, "affine", mx.bfloat16, device=H100) for M in range(1, 65)]
            assert len({p.warps_k for p in plans}) == 1
        planner.set_split(None)
        for N, K in [(4096, 4096), (14336, 4096)]:
            plans = [planner.plan_dense(M, N, K, 4, 64, "affine", mx.bfloat16, device=H100) for M in range(1, 65)]
            assert len({p.warps_k for p in plans if p}) <= 1
    finally:
        planner.set_split(None)


def test_unmeasured_shape_takes_the_nearest_measured_range():
    # 14336 x 4096 and 4096 x 14336 bracket 12288 x 4096 in size; both win at M = 2..6.
    assert planner.m_range(TABLE, "affine", 4, 12288, 4096) == (2, 6)
    assert planner.m_range(TABLE, "mxfp8", 8, 4096, 4096) == (0, 0)  # no measurement of the mode


def test_winning_range_needs_the_margin_and_takes_the_longest_run():
    points = [(M, s, M) for M, s in [(1, 1.05), (2, 1.3), (3, 2.0), (4, 0.9), (5, 1.5), (6, 1.6), (7, 1.7), (8, 0.5)]]
    assert planner.winning_range(points) == (5, 7)
    assert planner.winning_range([(2, 1.19, 2)]) == (0, 0)
    assert planner.winning_range([(2, 1.2, 2)]) == (2, 2)
    assert planner.winning_range([]) == (0, 0)


def test_a_single_row_needs_the_decode_margin():
    # M = 1 must clear DECODE_MIN_SPEEDUP (1.5, a chain's), the rest MIN_SPEEDUP (1.2).
    assert planner.winning_range([(1, 1.45, 1), (2, 1.3, 2), (3, 1.3, 3)]) == (2, 3)
    assert planner.winning_range([(1, 1.55, 1), (2, 1.3, 2), (3, 1.3, 3)]) == (1, 3)
    # MoE: sizes are pairs; a single token's pairs need the decode margin, the others 1.2.
    assert planner.winning_range([(8, 1.45, 1), (16, 1.3, 2)]) == (16, 16)
    assert planner.winning_range([(8, 1.55, 1), (16, 1.15, 2)]) == (8, 8)


# Llama-3-8B's layers at M = 1 in the H200 table rest on an end-to-end A/B, not on the
# kernel benchmark: alone at M = 1 the kernel is below the bar, yet a decode token running
# the fused q/k/v, gate/up and residual launches (fewer kernels) was faster (RUNS.md run 18).
DECODE_AB = ("h200/run18/e2e_llama_candidate_m1_c3/bench_e2e.json", "llama3-8b",
             {"affine4:14336x4096", "affine4:4096x14336", "affine4:4096x4096", "affine4:1024x4096"})


def test_committed_tables_keep_the_margin():
    """Each installed table's ranges are what its benchmark measured at
    plan.required_speedup(M) or more (tables regenerate with --retune; the H200's
    from run 14's sweep in dependent chains), and the M = 1 entries taken on the
    decode A/B are what its record measured: plain decode 1.15x MLX's or more."""
    import json
    import pathlib

    root = pathlib.Path(__file__).parent.parent / "benchmarks"
    record, model, decode_keys = DECODE_AB
    plain = json.loads((root / record).read_text())["models"][model]["plain"]
    assert plain["patched"]["tps"] / plain["mlx"]["tps"] >= 1.15
    for table_name, bench in [("NVIDIA H100 80GB HBM3", root / "kernels" / "bench_kernels.json"),
                              ("NVIDIA H200", root / "h200" / "run14" / "kernels_sweep" / "bench_kernels.json")]:
        table = planner.load_tuning(table_name)
        rows = json.loads(bench.read_text())["rows"]
        for key, (lo, hi) in table["m_range"].items():
            if table_name == "NVIDIA H200" and key in decode_keys:
                lo = max(lo, 2)
            measured = {r["M"]: r["speedup"] for r in rows
                        if f"{r['mode']}{r['bits']}:{r['N']}x{r['K']}" == key}
            assert all(measured[M] >= planner.required_speedup(M) for M in measured if lo <= M <= hi), key


def test_the_h200_tables_other_modes_are_what_tune_wrote():
    """The H200 table's 5- and 8-bit rows (the Qwen3-Next model's) are the ranges that
    run 18's ``mtp-splitk tune --quick --model`` measured, unchanged."""
    import json
    import pathlib

    record = pathlib.Path(__file__).parent.parent / "benchmarks/h200/run18/tune_qwen3_next_c1/nvidia_h200.json"
    tuned = json.loads(record.read_text())
    table = planner.load_tuning("NVIDIA H200")
    for section in ("m_range", "moe_p_range", "moe_glu_p_range"):
        other = {k: v for k, v in table[section].items() if not k.startswith("affine4:")}
        assert other == {k: v for k, v in tuned[section].items() if not k.startswith("affine4:")}, section
    assert any(k.startswith("affine5:") for k in table["m_range"])


def test_the_h200_tables_moe_entries_are_what_run_21_measured():
    """The H200 table's 4-bit MoE entries for the shapes run 21's bench_moe --tune
    measured (lean loop): every measured pair count inside a range cleared
    plan.required_speedup (the grouped kernel's judged speedup; the fused gate/up
    launch's against MLX's three ops), the range starts where bench_moe's ranges
    from those records start, and the split and depth are the sweep's."""
    import json
    import pathlib

    from mtp_splitk.bench.kernels import moe_ranges

    root = pathlib.Path(__file__).parent.parent / "benchmarks/h200/run21"
    rows = []
    for name in ("moe_qwen30b_c1", "moe_others_c3"):
        rows += json.loads((root / name / "bench_moe.json").read_text())["rows"]
    table = planner.load_tuning("NVIDIA H200")
    glu = [{**{k: r[k] for k in ("E", "N", "K", "pairs", "M")}, "speedup": r["us_glu_mlx"] / r["us_glu_ours"]}
           for r in rows if "us_glu_ours" in r]  # as bench_moe.write_ranges: independent calls, no M = 1
    for section, measured in (("moe_p_range", rows), ("moe_glu_p_range", glu)):
        by_key = {}
        for r in measured:
            by_key.setdefault(f"affine4:{r['E'] * r['N']}x{r['K']}", []).append(r)
        ranges = moe_ranges(measured)
        for key, mine in by_key.items():
            lo, hi = table[section][key]
            assert all(r["speedup"] >= planner.required_speedup(r["M"]) for r in mine if lo <= r["pairs"] <= hi), key
            assert lo == ranges[key][0], key
    for r in rows:
        shape = f"{r['E']}x{r['N']}x{r['K']}"
        assert (table["moe_warps_k"][shape], table["moe_depth"][shape]) == (r["warps_k"], r["depth"]), shape


def test_unsupported_inputs_stay_on_mlx():
    planner.set_split(4)
    try:
        assert planner.plan_dense(2, 4096, 4096, 4, 64, "affine", mx.float32, device=H100) is None
        assert planner.plan_dense(2, 4096, 4016, 4, 16, "nvfp4", mx.bfloat16, device=H100) is None  # K % 32 != 0
        assert planner.plan_dense(2, 4096, 4096, 1, 64, "affine", mx.bfloat16, device=H100) is None  # 1-bit
        assert planner.plan_dense(65, 4096, 4096, 4, 64, "affine", mx.bfloat16, device=H100) is None
        assert planner.plan_dense(2, 4096, 4096, 4, 32, "mxfp4", mx.bfloat16, device=H100) is not None
    finally:
        planner.set_split(None)


def test_forced_split_and_off():
    try:
        planner.set_split(8)
        plan = planner.plan_dense(40, 2048, 768, 4, 64, "affine", mx.bfloat16, device=H100)
        assert plan.warps_k == 8 and plan.token_tiles == 8
        planner.set_split(0)
        assert planner.plan_dense(2, 14336, 4096, 4, 64, "affine", mx.bfloat16, device=H100) is None
    finally:
        planner.set_split(None)


@pytest.mark.parametrize("bad", [-1, 3, 16])
def test_bad_split_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="split-K"):
        planner.set_split(bad)


def test_token_tiles_and_blocks():
    assert [planner.token_tiles_for(m) for m in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]
    plan = planner.Plan("cuda", "affine", 4, 64, 1000, 4096, 2, 1, 1, 2)
    assert plan.blocks == -(-1000 // 32)


def test_choose_warps_k_respects_chunks_and_choices():
    assert planner.choose_warps_k(16, 128, 132) == 1  # one chunk of K: one warp
    for N, K in [(4096, 4096), (1024, 4096), (151936, 2048), (16, 14336)]:
        assert planner.choose_warps_k(N, K, 132) in planner.WARP_CHOICES


def test_fused_gate_up_of_experts_only_where_the_grouped_kernel_is_planned():
    """plan_gather_glu follows plan_gather (same plan), on CUDA only, and declines
    splits a block of both weights' warps cannot hold."""
    args = (128, 768, 2048, 4, 64, "affine", mx.bfloat16)
    try:
        planner.set_split(2)
        assert planner.plan_gather_glu(40, *args, device=H100) == planner.plan_gather(40, *args, device=H100)
        metal = planner.Device("metal", "Apple M2 Ultra", 76)
        assert planner.plan_gather(40, *args, device=metal) is not None
        assert planner.plan_gather_glu(40, *args, device=metal) is None
        planner.set_split(8)
        assert planner.plan_gather_glu(40, *args, device=H100) is None  # 16 warps a block
        planner.set_split(0)
        assert planner.plan_gather_glu(40, *args, device=H100) is None
    finally:
        planner.set_split(None)


def test_the_lean_k_loop_is_the_default_and_takes_one_token_tile_unless_told(monkeypatch):
    METAL = planner.Device("metal", "Apple M2", 10)
    with planner.split(4):
        take = lambda M, device=H100: planner.plan_dense(M, 4096, 4096, 4, 64, "affine", mx.bfloat16, device=device)
        moe = lambda P: planner.plan_gather(P, 128, 768, 2048, 4, 64, "affine", mx.bfloat16, H100)
        monkeypatch.setenv("MTP_SPLITK_LEAN", "0")
        assert not take(1).lean and not moe(8).lean
        monkeypatch.delenv("MTP_SPLITK_LEAN", raising=False)
        assert take(1).lean and take(8).lean and moe(40).lean
        assert not take(9).lean and not take(64).lean  # two or more token tiles: the plain loop
        monkeypatch.setenv("MTP_SPLITK_LEAN_TILES", "2")  # the measurement knob for more tiles
        assert take(9).lean and take(16).lean and not take(17).lean
        assert not take(1, METAL).lean  # the Metal kernel has one K loop
        fused = planner.plan_multi(1, [4096, 1024], 4096, 4, 64, "affine", mx.bfloat16, H100)
        assert all(p.lean for p in fused.members)


def test_riders_join_a_planned_widest_weight_at_their_own_split(monkeypatch):
    """With MTP_SPLITK_RIDERS=1, q/k/v at a k = 4 verify on the H200 table (q 4096x2048
    planned at M = 2..7, k and v 512x2048 never) fuse, k and v at the plan the kernel
    gives them alone; not without the switch, not where q is not planned."""
    args = (2048, 4, 64, "affine", mx.bfloat16, H200)
    multi = lambda M: planner.plan_multi(M, (4096, 512, 512), *args)
    monkeypatch.delenv("MTP_SPLITK_RIDERS", raising=False)
    assert multi(5) is None
    monkeypatch.setenv("MTP_SPLITK_RIDERS", "1")
    fused = multi(5)
    alone = planner.plan_dense(5, 512, *args, in_range=False)
    assert planner.plan_dense(5, 512, *args) is None and alone is not None
    assert fused.members[0] == planner.plan_dense(5, 4096, *args)
    assert fused.members[1].warps_k == fused.members[2].warps_k == alone.warps_k
    assert multi(1) is None  # q on MLX at M = 1: nothing to ride in
    assert planner.plan_multi(5, (4096, 64), *args) is None  # the table splits 64x2048 in 8, not 4
