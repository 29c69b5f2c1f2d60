# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk tune`` on the CPU: the refusal, the variants a model needs,
the table it writes (from stand-in measurements) and the planner reading
that table before the shipped one, never planning a variant that failed."""

import io
import json

import mlx.core as mx
import pytest
from _cli import error_lines
from mlx_lm import load

from mtp_splitk import cache, cli, ops, patch
from mtp_splitk import plan as planner
from mtp_splitk import synthetic
from mtp_splitk.bench import tune

H200 = planner.Device("cuda", "NVIDIA H200", 132)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty user cache; the planner re-reads its tables before and after."""
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    planner.load_tuning.cache_clear()
    yield tmp_path / "cache"
    planner.load_tuning.cache_clear()


def test_tune_refuses_on_the_cpu(tmp_path, capsys):
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # so on a GPU machine too
    try:
        _refuses(tmp_path, capsys)
    finally:
        mx.set_default_device(device)


def _refuses(tmp_path, capsys):
    assert cli.main(["tune"]) == 2
    assert cli.main(["tune", "--quick", "--model", str(tmp_path)]) == 2  # before any loading
    assert error_lines(capsys.readouterr().err) == [
        "mtp-splitk: error: tune needs a GPU (MLX's default device is the CPU)"
    ] * 2


def test_planner_reads_the_user_table_first_and_skips_failed_variants(user_cache):
    def dense(M, N, K):
        return planner.plan_dense(M, N, K, 4, 64, "affine", mx.bfloat16, H200)

    def moe(P):
        return planner.plan_gather(P, 128, 768, 2048, 4, 64, "affine", mx.bfloat16, H200)

    # The shipped H200 table: 4096x2048 (Qwen3's q) at M = 4..7, 14336x4096 at M = 1..7,
    # the Qwen3 experts (128 x 768 x 2048) from 96 pairs.
    assert dense(1, 4096, 2048) is None and dense(4, 14336, 4096) is not None
    assert moe(128) is not None
    user = json.loads(open(f"{planner.TUNING_DIR}/nvidia_h200.json").read())
    user["m_range"]["affine4:4096x2048"] = [1, 64]
    user["warps_k"]["4096x2048"] = 8
    user["failed"] = {
        "dense:affine:b4:g64:14336x4096": "M=3: relative error 0.4 against MLX's op (limit 0.01)",
        "moe:affine:b4:g64:128x768x2048": "M=1: outputs left unwritten (NaN poison) or NaN",
    }
    path = planner.user_tuning_path(H200.name)
    assert path == str(user_cache / "tuning" / "nvidia_h200.json")
    tune.write_table(path, user)
    planner.load_tuning.cache_clear()

    assert dense(1, 4096, 2048).warps_k == 8  # the user's range and split
    assert dense(4, 14336, 4096) is None and moe(128) is None  # failed: never planned
    with planner.split(4):  # not even forced
        assert dense(4, 14336, 4096) is None and moe(128) is None
        assert dense(4, 4096, 14336) is not None  # the rest still forced
    # 4-bit g32 is another variant of the same shape: not the one that failed.
    assert planner.plan_dense(4, 14336, 4096, 4, 32, "affine", mx.bfloat16, H200) is not None


def stand_ins(monkeypatch, speedups, failing, glu_speedups=None, glu_failing=()):
    """tune's measurements replaced: a split per op, the check failing for the
    variants in ``failing`` (their fused gate/up in ``glu_failing``), and rows
    with the given speedup per M (the fused gate/up's ``glu_speedups``)."""
    calls = []

    def choose_split(variant, device, table, quick):
        return (2, 1, 1) if variant.op == "dense" else (4, 1, 1)

    def check(variant, device, split, glu=False):
        calls.append(("check glu" if glu else "check", str(variant), split))
        if variant in (glu_failing if glu else failing):
            return "M=13: relative error 0.3 against MLX's op (limit 0.01)"
        return None

    def measure(variant, device, split, quick, glu=False):
        calls.append(("measure glu" if glu else "measure", str(variant), split, quick))
        return [dict(op=variant.op, mode=variant.mode, bits=variant.bits, N=variant.N,
                     K=variant.K, E=variant.E, M=M, pairs=M * variant.top_k, speedup=s,
                     chain_us_ours=1.0)  # measure's rows have chains: M = 1 is judgeable
                for M, s in (glu_speedups if glu else speedups).items()]

    for name, fn in (("choose_split", choose_split), ("check", check), ("measure", measure)):
        monkeypatch.setattr(tune, name, fn)
    return calls


def test_tune_writes_a_table_the_planner_uses(user_cache, monkeypatch):
    gpu = planner.Device("cuda", "Pretend GPU 9000", 100)
    a = tune.Variant("dense", "affine", 4, 64, 1024, 2048)
    b = tune.Variant("dense", "mxfp4", 4, 32, 512, 1024)
    c = tune.Variant("moe", "affine", 4, 64, 256, 512, E=16, top_k=4, glu=True)
    # M = 1 misses the 1.5x decode bar (a chain's); M = 2..5 clear 1.2x; M = 6 does not.
    speedups = {1: 1.05, 2: 2.0, 3: 1.9, 4: 1.6, 5: 1.3, 6: 1.1, 8: 1.4}
    glu_speedups = {1: 1.6, 2: 1.5, 4: 1.3, 8: 1.1}  # the fused gate/up: M = 1..4
    calls = stand_ins(monkeypatch, speedups, failing={b}, glu_speedups=glu_speedups)
    stream = io.StringIO()
    path, table, outcome = tune.tune([a, b, c], gpu, True, "mtp-splitk tune --quick",
                                     stream=stream)

    assert outcome == {a: None, b: "M=13: relative error 0.3 against MLX's op (limit 0.01)",
                       c: None}
    assert [c[0] for c in calls] == ["check", "measure", "check", "check", "measure", "check glu",
                                     "measure glu"]
    assert "[########" in stream.getvalue() and "Done: 3/3" in stream.getvalue()
    written = json.loads(open(path).read())
    assert written == table
    shipped = json.loads(open(f"{planner.TUNING_DIR}/nvidia_h200.json").read())
    assert set(written) == set(shipped) | {"failed"}  # the shipped format plus failures
    assert written["device"] == gpu.name and written["mlx"] == mx.__version__
    assert written["m_range"] == {"affine4:1024x2048": [2, 5], "mxfp44:512x1024": [0, 0]}
    assert written["moe_p_range"] == {"affine4:4096x512": [8, 20]}  # pairs of M = 2..5
    assert written["moe_glu_p_range"] == {"affine4:4096x512": [4, 16]}  # pairs of M = 1..4
    assert written["warps_k"] == {"1024x2048": 2} and written["depth"] == {"1024x2048": 1}
    assert written["moe_warps_k"] == {"16x256x512": 4} and written["moe_depth"] == {"16x256x512": 1}
    assert written["failed"] == {"dense:mxfp4:b4:g32:512x1024": outcome[b]}

    planner.load_tuning.cache_clear()
    plan = planner.plan_dense(3, 1024, 2048, 4, 64, "affine", mx.bfloat16, gpu)
    assert plan is not None and plan.warps_k == 2
    assert planner.plan_dense(1, 1024, 2048, 4, 64, "affine", mx.bfloat16, gpu) is None
    assert planner.plan_dense(6, 1024, 2048, 4, 64, "affine", mx.bfloat16, gpu) is None
    with planner.split(4):
        assert planner.plan_dense(3, 512, 1024, 4, 32, "mxfp4", mx.bfloat16, gpu) is None
    assert planner.plan_gather(12, 16, 256, 512, 4, 64, "affine", mx.bfloat16, gpu) is not None
    glu = planner.plan_gather_glu(4, 16, 256, 512, 4, 64, "affine", mx.bfloat16, gpu)
    assert glu is not None and (glu.warps_k, glu.depth) == (4, 1)  # the split tune wrote
    assert planner.plan_gather_glu(20, 16, 256, 512, 4, 64, "affine", mx.bfloat16, gpu) is None

    # A later run (another model) keeps what the first one measured, and a
    # variant that passes now is no longer failed.
    calls = stand_ins(monkeypatch, {1: 2.0, 2: 2.0}, failing=set())
    _, again, _ = tune.tune([b], gpu, True, "mtp-splitk tune", stream=io.StringIO())
    assert again["failed"] == {}
    assert again["m_range"] == {"affine4:1024x2048": [2, 5], "mxfp44:512x1024": [1, 2]}


def test_the_variants_are_the_calls_a_forward_makes(tmp_path):
    """tune's variants of a model are exactly the quantized matmuls its
    patched forward calls (ops.recording), with the model's modes."""
    for family, quantization in [("qwen3_moe", None), ("llama", {"mode": "mxfp4"})]:
        kwargs = {} if quantization is None else {"quantization": quantization}
        path = synthetic.write_model(tmp_path / family, family, **kwargs)
        model, _ = load(str(path))
        variants = tune.model_variants(model)
        with patch.enabled(), ops.recording() as calls:
            mx.eval(model(mx.array([[1, 2, 3]])))
        ops_seen = {("dense" if c.op == "quantized_matmul" else "moe", c.N, c.K) for c in calls}
        assert {(v.op, v.N, v.K) for v in variants} == ops_seen, family
        assert {v.mode for v in variants} == {(quantization or {}).get("mode", "affine")}
        assert all(v.dtype == "bfloat16" for v in variants)
        moe = [v for v in variants if v.op == "moe"]
        if family == "qwen3_moe":
            assert moe and {v.top_k for v in moe} == {model.args.num_experts_per_tok}
            assert {v.E for v in moe} == {model.args.num_experts}
        else:
            assert not moe
    assert all(tune.runnable(v) for v in tune.default_variants())


def test_the_sweep_takes_the_split_with_the_best_worst_chain(monkeypatch):
    """sweep_split times every (split, depth, row tiles) in dependent chains at each of
    SPLIT_MS and keeps the lowest worst case; splits wider than K's chunks are not tried."""
    seen = []

    def chain_us(plan, x, sets, mode, bits, group_size):
        seen.append((plan.warps_k, plan.depth, plan.row_tiles, x.shape[0]))
        if (plan.warps_k, plan.depth, plan.row_tiles) == (2, 3, 1):  # best at M = 1 only
            return 10.0 if x.shape[0] == 1 else 90.0
        if (plan.warps_k, plan.depth, plan.row_tiles) == (4, 2, 1):  # good at both: the pick
            return 30.0
        return 50.0

    monkeypatch.setattr(tune.kernels, "chain_us", chain_us)
    monkeypatch.setattr(tune, "_weights", lambda v, copies_for_l2: [None])
    variant = tune.Variant("dense", "affine", 4, 64, 256, 512)  # K = 512: 4 chunks of 128
    lines = []
    assert tune.sweep_split(variant, H200, log=lines.append) == (4, 2, 1)
    tried = {s[:3] for s in seen}
    assert max(w for w, _, _ in tried) == 4  # 8 warps would exceed 4 chunks
    assert len(tried) == 3 * len(tune.SPLIT_DEPTHS) * 2  # warps 1, 2, 4
    assert {s[3] for s in seen} == set(tune.SPLIT_MS)
    assert len(lines) == 1 and "(4, 2, 1):30.0" in lines[0]


def test_m1_is_judged_by_the_chain_alone():
    assert tune.judged_speedup(1, independent=3.0, chain=1.05) == 1.05
    assert tune.judged_speedup(5, independent=3.0, chain=1.4) == 1.4
    assert tune.judged_speedup(5, independent=1.3, chain=1.4) == 1.3


def test_fused_shapes_share_a_split_only_where_it_costs_little():
    """q/k/v fuse only at one warps-along-K value: shared_splits picks the value
    cheapest over the calls, each shape keeping its best depth and row tiles
    there, and declines when sharing costs more than the tolerance."""
    q = {(2, 1, 1): 12.0, (2, 3, 1): 11.0, (4, 1, 1): 10.0, (8, 1, 1): 14.0}
    kv = {(2, 1, 1): 9.0, (4, 1, 1): 8.5, (4, 2, 2): 8.2, (8, 1, 1): 7.8}
    shared = tune.shared_splits({"q": q, "kv": kv}, {"q": 2, "kv": 2})
    # warps 4: 2*10 + 2*8.2 = 36.4, against 2*10 + 2*7.8 = 35.6 apart (within 10%).
    assert shared == {"q": (4, 1, 1), "kv": (4, 2, 2)}
    far = {(2, 1, 1): 30.0, (8, 1, 1): 5.0}
    assert tune.shared_splits({"q": q, "kv": far}, {"q": 2, "kv": 2}) is None
    assert tune.shared_splits({"q": {(1, 1, 1): 1.0}, "kv": {(2, 1, 1): 1.0}}, {"q": 1, "kv": 1}) is None


def test_a_row_without_a_chain_cannot_admit_m1():
    """M = 1's margin is a chain's: a table built from rows of independent ops alone
    (bench_moe's, the records before run 13) starts at M = 2."""
    from mtp_splitk.bench import kernels

    def rows(chain):
        extra = {"chain_us_ours": 1.0} if chain else {}
        return [dict(mode="affine", bits=4, N=64, K=128, M=M, speedup=2.0, **extra) for M in (1, 2, 3)]

    meta = dict(device="d", command="c", mlx="m")
    assert kernels.tuning_table(rows(False), {}, {}, {}, meta)["m_range"] == {"affine4:64x128": (2, 3)}
    assert kernels.tuning_table(rows(True), {}, {}, {}, meta)["m_range"] == {"affine4:64x128": (1, 3)}
    moe = [dict(E=8, N=64, K=128, pairs=8 * M, M=M, speedup=2.0) for M in (1, 2)]
    assert kernels.moe_ranges(moe) == {"affine4:512x128": [16, 16]}


def test_bench_moe_writes_splits_only_from_swept_rows(tmp_path):
    """bench_moe's table names each shape's split and depth only where its rows ran
    at the sweep's choices; a record from before the sweep (no depth: run 3's)
    retunes into ranges alone."""
    from scripts import bench_moe

    old = [dict(E=8, N=64, K=128, pairs=8 * M, M=M, speedup=2.0, warps_k=2) for M in (2, 3)]
    meta = dict(device="Pretend GPU 9000", command="scripts/bench_moe.py --tune")
    bench_moe.write_ranges(old, meta, tmp_path)
    path = tmp_path / f"{planner.tuning_key(meta['device'])}_moe.json"
    table = json.loads(path.read_text())
    assert table["moe_p_range"] == {"affine4:512x128": [16, 24]} and "moe_warps_k" not in table
    swept = [dict(row, depth=3) for row in old]
    bench_moe.write_ranges(swept, dict(meta, swept=True), tmp_path)
    table = json.loads(path.read_text())
    assert table["moe_warps_k"] == {"8x64x128": 2} and table["moe_depth"] == {"8x64x128": 3}


def test_the_grouped_kernel_takes_its_split_and_depth_from_the_table(user_cache):
    """moe_warps_k / moe_depth (bench_moe --tune) fix the grouped kernel's split and
    prefetch depth per expert shape, for every pair count; unlisted shapes keep the rule."""
    table = {"moe_p_range": {"affine4:98304x2048": [8, 256], "affine4:262144x768": [8, 256]},
             "moe_warps_k": {"128x768x2048": 2}, "moe_depth": {"128x768x2048": 3}}
    path = planner.user_tuning_path(H200.name)
    tune.write_table(path, table)
    planner.load_tuning.cache_clear()
    plans = [planner.plan_gather(P, 128, 768, 2048, 4, 64, "affine", mx.bfloat16, H200) for P in (8, 40, 128)]
    assert {(p.warps_k, p.depth) for p in plans} == {(2, 3)}
    other = planner.plan_gather(40, 128, 2048, 768, 4, 64, "affine", mx.bfloat16, H200)
    assert (other.warps_k, other.depth) == (planner.choose_warps_k(8 * 2048, 768, H200.sm_count), 1)


def test_install_tuning_merges_the_moe_run_per_shape_or_keeps_the_installed_entries(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_tuning", tune.__file__.replace(
        "mtp_splitk/bench/tune.py", "scripts/install_tuning.py"))
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    monkeypatch.setattr(install, "TUNING", str(tmp_path / "tuning"))
    (tmp_path / "tuning").mkdir()
    kernels, moe = tmp_path / "kernels", tmp_path / "moe"
    kernels.mkdir(), moe.mkdir()
    (kernels / "gpu.json").write_text(json.dumps({"m_range": {"a": [2, 7]}}))
    (moe / "gpu_moe.json").write_text(json.dumps({"moe_p_range": {"b": [8, 64]}, "moe_warps_k": {"s": 2},
                                                  "moe_depth": {"s": 3}, "device": "x"}))
    assert install.main("gpu", str(kernels), str(moe)) == 0
    installed = json.loads((tmp_path / "tuning" / "gpu.json").read_text())
    assert installed == {"m_range": {"a": [2, 7]}, "moe_p_range": {"b": [8, 64]}, "moe_warps_k": {"s": 2},
                         "moe_depth": {"s": 3}}
    (kernels / "gpu.json").write_text(json.dumps({"m_range": {"a": [3, 5]}}))
    assert install.main("gpu", str(kernels)) == 0  # no MoE run: the installed MoE entries stay
    installed = json.loads((tmp_path / "tuning" / "gpu.json").read_text())
    assert installed["m_range"] == {"a": [3, 5]} and installed["moe_depth"] == {"s": 3}
    (kernels / "gpu.json").unlink()
    (moe / "gpu_moe.json").write_text(json.dumps({"moe_p_range": {"c": [1, 40]}, "moe_depth": {"s": 2}}))
    assert install.main("gpu", str(kernels), str(moe)) == 0  # an MoE run alone, of one more shape
    installed = json.loads((tmp_path / "tuning" / "gpu.json").read_text())
    assert installed == {"m_range": {"a": [3, 5]}, "moe_p_range": {"b": [8, 64], "c": [1, 40]},
                         "moe_warps_k": {"s": 2}, "moe_depth": {"s": 2}}
    (moe / "gpu_moe.json").unlink()
    assert install.main("gpu", str(kernels), str(moe)) == 1  # nothing measured: nothing touched
    assert json.loads((tmp_path / "tuning" / "gpu.json").read_text()) == installed


def test_the_fused_gate_up_of_experts_needs_its_own_measured_range(user_cache):
    """Planned automatically only inside the table's moe_glu_p_range (bench_moe --tune
    measured the fused launch faster than MLX's three ops there), whatever the
    unfused grouped kernel's range, at the grouped kernel's split."""
    args = (128, 768, 2048, 4, 64, "affine", mx.bfloat16, H200)
    path = planner.user_tuning_path(H200.name)
    tune.write_table(path, {"moe_p_range": {"affine4:98304x2048": [8, 256]}})
    planner.load_tuning.cache_clear()
    assert planner.plan_gather(40, *args) is not None and planner.plan_gather_glu(40, *args) is None
    tune.write_table(path, {"moe_p_range": {"affine4:98304x2048": [8, 256]},
                            "moe_glu_p_range": {"affine4:98304x2048": [16, 512]}})
    planner.load_tuning.cache_clear()
    assert planner.plan_gather_glu(40, *args) == planner.plan_gather(40, *args)
    assert planner.plan_gather_glu(8, *args) is None  # below the fused range
    assert planner.plan_gather(300, *args) is None
    fused = planner.plan_gather_glu(300, *args)  # past the unfused range, inside the fused one
    assert fused is not None and fused == planner.plan_gather(40, *args)


def test_a_failed_fused_gate_up_check_is_recorded_and_never_planned(user_cache, monkeypatch):
    """The fused gate/up launch fails its own check (failed's "moe_glu" kind): the
    grouped kernel keeps its range, the fused launch is never planned, not even
    forced; a later run that passes clears it. On Metal it is not tuned at all."""
    gpu = planner.Device("cuda", "Pretend GPU 9000", 100)
    c = tune.Variant("moe", "affine", 4, 64, 256, 512, E=16, top_k=4, glu=True)
    args = (16, 256, 512, 4, 64, "affine", mx.bfloat16, gpu)
    stand_ins(monkeypatch, {2: 2.0, 4: 2.0}, failing=set(), glu_speedups={2: 2.0, 4: 2.0}, glu_failing={c})
    _, table, outcome = tune.tune([c], gpu, True, "mtp-splitk tune", stream=io.StringIO())
    assert outcome == {c: None}  # the grouped kernel passed
    assert table["failed"] == {"moe_glu:affine:b4:g64:16x256x512": "M=13: relative error 0.3 against "
                               "MLX's op (limit 0.01)"}
    assert table["moe_glu_p_range"] == {"affine4:4096x512": [0, 0]}
    assert table["moe_p_range"] == {"affine4:4096x512": [8, 16]}
    planner.load_tuning.cache_clear()
    assert planner.plan_gather(8, *args) is not None and planner.plan_gather_glu(8, *args) is None
    with planner.split(2):
        assert planner.plan_gather(8, *args) is not None and planner.plan_gather_glu(8, *args) is None

    stand_ins(monkeypatch, {2: 2.0, 4: 2.0}, failing=set(), glu_speedups={2: 2.0, 4: 2.0})
    _, table, _ = tune.tune([c], gpu, True, "mtp-splitk tune", stream=io.StringIO())
    assert table["failed"] == {} and table["moe_glu_p_range"] == {"affine4:4096x512": [8, 16]}
    planner.load_tuning.cache_clear()
    assert planner.plan_gather_glu(8, *args) == planner.plan_gather(8, *args)

    mac = planner.Device("metal", "Pretend Mac 9000", 10)
    calls = stand_ins(monkeypatch, {2: 2.0}, failing=set(), glu_speedups={2: 2.0})
    _, table, _ = tune.tune([c], mac, True, "mtp-splitk tune", stream=io.StringIO())
    assert [c[0] for c in calls] == ["check", "measure"] and "moe_glu_p_range" not in table


def fake_gather_glu(swap=False, unwritten=False):
    """launch.gather_glu's stand-in on the CPU: MLX's ops on the kernel's call (pair p
    reads x row p // x_div), with gate and up swapped or the last pair left to the poison."""
    from mtp_splitk.bench import kernels
    from mlx_lm.models.activations import swiglu

    seen = []

    def gather_glu(plan, x, gate, up, idx, x_div, poison=None):
        seen.append(x_div)
        P = idx.size
        rows = x[mx.arange(P) // x_div][:, None, :]
        g, u = (kernels.gather_call(None, (rows, idx, False), w, 1, plan.mode, plan.bits, plan.group_size)
                for w in ((up, gate) if swap else (gate, up)))
        out = swiglu(g, u).reshape(P, plan.N)
        if unwritten:
            out = mx.concatenate([out[:-1], mx.full((1, plan.N), poison, out.dtype)])
        return out

    return gather_glu, seen


def test_the_fused_gate_up_check_compares_with_mlx_three_ops(monkeypatch):
    """check(glu=True) runs the fused launch on sorted and unsorted calls against
    swiglu of MLX's two gather_qmm, with gate and up distinct weights (a mix-up
    shows) and the output NaN-poisoned (a pair left unwritten shows)."""
    variant = tune.Variant("moe", "affine", 4, 64, 256, 512, E=16, top_k=8, glu=True)
    fake, seen = fake_gather_glu()
    monkeypatch.setattr(tune.kernels.launch, "gather_glu", fake)
    assert tune.check(variant, H200, (2, 1, 1), glu=True) is None
    assert set(seen) == {1, 8}  # pre-sorted (M * top_k >= 64) and unsorted calls
    monkeypatch.setattr(tune.kernels.launch, "gather_glu", fake_gather_glu(swap=True)[0])
    assert "relative error" in tune.check(variant, H200, (2, 1, 1), glu=True)
    monkeypatch.setattr(tune.kernels.launch, "gather_glu", fake_gather_glu(unwritten=True)[0])
    assert "NaN poison" in tune.check(variant, H200, (2, 1, 1), glu=True)


def test_switch_glu_pairs_are_the_variants_whose_fused_launch_is_tuned():
    """Variant.glu marks the experts of a SwitchGLU gate/up pair with mlx-lm's SwiGLU
    (what fused.switch_glu fuses); its down projection and other activations' pairs
    (gpt-oss's) are not."""
    import mlx.nn as nn
    from mlx_lm.models.activations import SwigluOAI
    from mlx_lm.models.switch_layers import SwitchGLU

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = SwitchGLU(128, 256, 8)
            self.oai = SwitchGLU(128, 512, 8, activation=SwigluOAI())

    model = Experts()
    nn.quantize(model, 64, 4)
    assert {(v.E, v.N, v.K): v.glu for v in tune.model_variants(model)} == {
        (8, 256, 128): True, (8, 128, 256): False, (8, 512, 128): False, (8, 128, 512): False}
    assert [(v.E, v.N, v.K) for v in tune.default_variants() if v.glu] == [(128, 768, 2048)]
