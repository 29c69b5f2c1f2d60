# Copyright © 2026 mtp_splitk contributors

"""The Gated DeltaNet recurrence's routing (mtp_splitk.gated_delta) on the CPU:
the planner's decision, the patch's swap of mlx-lm's function, the row-by-row
fallback against mlx-lm's own call over all rows, and the kernel path wired
through a model with a stand-in for the launch (tests/test_gated_delta_gpu.py
runs the kernel itself)."""

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models import gated_delta as mlx_gd
from mlx_lm.models import qwen3_5, qwen3_next

from mtp_splitk import gated_delta, launch, patch, plan as planner, synthetic
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.speculative.pipelined import pipelined_generate_step
from _stand_ins import gated_delta_by_ops, pretend_gpu

CUDA = planner.Device("cuda", "pretend GPU", 132)


def inputs(B=1, S=4, Hk=2, Hv=4, dk=32, dv=32, seed=0):
    mx.random.seed(seed)
    q, k = (mx.random.normal((B, S, Hk, dk)).astype(mx.bfloat16) * 0.3 for _ in range(2))
    v = mx.random.normal((B, S, Hv, dv)).astype(mx.bfloat16)
    a, b = (mx.random.normal((B, S, Hv)).astype(mx.bfloat16) for _ in range(2))
    A_log = mx.random.normal((Hv,)) * 0.5
    dt_bias = mx.random.normal((Hv,)).astype(mx.bfloat16)
    state = mx.random.normal((B, Hv, dv, dk)) * 0.1
    return q, k, v, a, b, A_log, dt_bias, state


@pytest.fixture
def kernel_on(monkeypatch):
    monkeypatch.delenv("MTP_SPLITK_GATED_DELTA", raising=False)  # on by default


def test_the_kernel_is_on_by_default_and_off_with_the_variable(monkeypatch):
    monkeypatch.delenv("MTP_SPLITK_GATED_DELTA", raising=False)
    assert planner.plan_gated_delta(16, 32, 128, mx.bfloat16, CUDA)
    monkeypatch.setenv("MTP_SPLITK_GATED_DELTA", "0")
    assert not planner.plan_gated_delta(16, 32, 128, mx.bfloat16, CUDA)


def test_the_planner_takes_what_the_kernel_implements(monkeypatch, kernel_on):
    take = planner.plan_gated_delta
    assert take(16, 32, 128, mx.bfloat16, CUDA) and take(2, 4, 64, mx.float16, CUDA)
    assert not take(16, 32, 128, mx.bfloat16, planner.Device("cpu", "cpu", 0))
    assert not take(16, 32, 128, mx.bfloat16, planner.Device("metal", "Apple M2", 10))  # mlx-lm's kernel there
    assert not take(2, 4, 16, mx.bfloat16, CUDA)  # a lane holds dk / 32 entries
    assert not take(2, 4, 512, mx.bfloat16, CUDA)
    assert not take(3, 4, 128, mx.bfloat16, CUDA)  # value heads in whole groups of key heads
    assert not take(16, 32, 128, mx.float32, CUDA)
    with planner.split(0):
        assert not take(16, 32, 128, mx.bfloat16, CUDA)  # the split forced off: MLX's ops everywhere
    monkeypatch.setenv("MTP_SPLITK_GATED_DELTA", "0")
    assert not take(16, 32, 128, mx.bfloat16, CUDA)


def test_the_patch_swaps_mlx_lms_function_and_puts_it_back():
    originals = qwen3_next.gated_delta_update, qwen3_5.gated_delta_update
    assert originals == (mlx_gd.gated_delta_update,) * 2
    with patch.enabled():
        assert qwen3_next.gated_delta_update is gated_delta.update
        assert qwen3_5.gated_delta_update is gated_delta.update
        patch.enable()  # again: nothing changes
        assert qwen3_next.gated_delta_update is gated_delta.update
    assert (qwen3_next.gated_delta_update, qwen3_5.gated_delta_update) == originals
    assert not gated_delta._enabled


def test_row_by_row_is_mlx_lms_call_over_all_rows():
    """Off the kernel, rows() keeps every row's state; its outputs and last state
    are what one mlx-lm call over the S rows gives, bit for bit."""
    q, k, v, a, b, A_log, dt_bias, state = inputs(B=2, S=5)
    y, states = gated_delta.rows(q, k, v, a, b, A_log, dt_bias, state)
    y_ref, final = mlx_gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    assert states.shape == (5, *state.shape) and states.dtype == mx.float32
    assert mx.array_equal(y, y_ref) and mx.array_equal(states[-1], final)
    y2, states2 = gated_delta.rows(q[:, :2], k[:, :2], v[:, :2], a[:, :2], b[:, :2], A_log, dt_bias, state)
    assert mx.array_equal(states2, states[:2])  # a row's state does not depend on the rows after it


def _stand_in(monkeypatch, launched):
    """launch.gated_delta computed by mlx-lm's ops one row at a time (what the
    kernel computes, up to the reductions' order)."""

    def fake(q, k, v, g, beta, state, all_states, poison=None):
        launched.append((q.shape[1], all_states))
        y, states = gated_delta_by_ops(q, k, v, g, beta, state)
        return y, states if all_states else states[-1:]

    monkeypatch.setattr(launch, "gated_delta", fake)


def test_update_takes_the_kernel_where_planned(monkeypatch, kernel_on):
    pretend_gpu(monkeypatch)
    launched = []
    _stand_in(monkeypatch, launched)
    q, k, v, a, b, A_log, dt_bias, state = inputs(S=3)
    expected = mlx_gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    assert launched == []  # disabled: mlx-lm's function
    with patch.enabled():
        y, final = gated_delta.update(q, k, v, a, b, A_log, dt_bias, state)
        assert launched == [(3, False)]
        assert mx.array_equal(y, expected[0]) and mx.array_equal(final, expected[1])
        gated_delta.update(q, k, v, a, b, A_log, dt_bias, state, mask=mx.ones((1, 3), mx.bool_))
        gated_delta.update(q, k, v, a, b, A_log, dt_bias, state, use_kernel=False)  # training
        gated_delta.update(q, k, v, a, b, A_log, dt_bias, state, lower_bound=-5.0)
        assert launched == [(3, False)]


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_a_patched_hybrid_runs_one_launch_a_layer_and_pass(tmp_path, monkeypatch, kernel_on, family):
    """With the patch on a (pretend) CUDA device, plain decode and the overlapped
    loop's verify passes each run one launch per Gated DeltaNet layer (the verify's
    keeping every row's state), and the loop still gives plain greedy tokens."""
    model, _ = load(str(synthetic.write_model(tmp_path / "m", family, "small")))  # dk = 64
    prompt = mx.array([1, 5, 9, 13, 17], mx.uint32)
    expected = [t for t, _ in generate_step(prompt, model, max_tokens=12)]
    layers = sum(hasattr(m, "A_log") for _, m in model.named_modules())
    pretend_gpu(monkeypatch)
    launched = []
    _stand_in(monkeypatch, launched)
    with patch.enabled():
        plain = [t for t, _ in generate_step(prompt, model, max_tokens=12)]
        decode = [entry for entry in launched if entry == (1, False)]
        assert plain == expected and len(decode) >= 11 * layers
        launched.clear()
        drafter = AcceptanceControlledDrafter(expected, 0.8, synthetic.TINY_VOCAB)
        out = [t for t, _, _ in pipelined_generate_step(prompt, model, drafter, num_draft_tokens=3,
                                                         max_tokens=12, compile_step=False)]
        assert out == expected
        # The verify passes: k + 1 = 4 rows in one launch a layer, every row's state kept.
        kept = [rows for rows, all_states in launched if all_states]
        assert kept and set(kept) == {4}
