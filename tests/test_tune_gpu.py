# Copyright © 2026 mtp_splitk contributors

"""``mtp-splitk tune --quick`` end to end on the GPU machine: a small
synthetic MoE model's every kernel variant checked, timed and written to the
user's table, which the planner then reads (on CUDA, SwitchGLU's fused gate/up
launch too)."""

import json
import time

import mlx.core as mx
import pytest
from mlx_lm import load

from mtp_splitk import cache, cli
from mtp_splitk import plan as planner
from mtp_splitk import synthetic
from mtp_splitk.bench import tune

pytestmark = pytest.mark.gpu


def test_tune_quick_on_a_small_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    planner.load_tuning.cache_clear()
    # "small": every matmul has K >= 128, so each one is a kernel variant.
    path = synthetic.write_model(tmp_path / "m", "qwen3_moe", "small")
    model, _ = load(str(path))
    variants = [v for v in tune.model_variants(model) if tune.runnable(v)]
    assert {v.op for v in variants} == {"dense", "moe"}
    assert any(v.glu for v in variants)  # Qwen3's SwitchGLU gate/up

    tic = time.perf_counter()
    try:
        assert cli.main(["tune", "--quick", "--model", str(path)]) == 0
    finally:
        planner.load_tuning.cache_clear()
    seconds = time.perf_counter() - tic
    out = capsys.readouterr()
    assert seconds < 600, seconds  # minutes, not hours
    device = planner.current_device()
    table_path = planner.user_tuning_path(device.name)
    last = out.out.splitlines()[-1]
    assert last.endswith(f"table: {table_path} (read before the shipped tables)")
    table = json.loads(open(table_path).read())
    assert table["failed"] == {}, table["failed"]  # every variant matches MLX's op here
    for v in variants:
        ranges = table["m_range"] if v.op == "dense" else table["moe_p_range"]
        lo, hi = ranges[v.range_key]
        assert 0 <= lo <= hi, v
        if v.op == "dense":
            assert table["warps_k"][f"{v.N}x{v.K}"] in planner.WARP_CHOICES
        else:
            assert table["moe_warps_k"][v.shape] in planner.WARP_CHOICES and table["moe_depth"][v.shape] >= 1
        if v.glu and device.backend == "cuda":  # the fused gate/up checked (failed is empty) and timed
            lo, hi = table["moe_glu_p_range"][v.range_key]
            assert 0 <= lo <= hi, v
    assert planner.load_tuning(device.name) == table  # the planner's table now
    for v in variants:  # and it plans from it
        if v.op == "dense":
            lo, hi = table["m_range"][v.range_key]
            planned = planner.plan_dense(max(lo, 1), v.N, v.K, v.bits, v.group_size, v.mode,
                                         mx.bfloat16)
            assert (planned is not None) == (hi > 0), v
        elif v.glu and device.backend == "cuda":
            lo, hi = table["moe_glu_p_range"][v.range_key]
            planned = planner.plan_gather_glu(max(lo, 1), v.E, v.N, v.K, v.bits, v.group_size, v.mode,
                                              mx.bfloat16)
            assert (planned is not None) == (hi > 0), v
    planner.load_tuning.cache_clear()
