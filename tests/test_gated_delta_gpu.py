# Copyright © 2026 mtp_splitk contributors

"""The Gated DeltaNet recurrence kernel (kernels/gated_delta.cu) on the GPU
against mlx-lm's ops: fresh random inputs, NaN-poisoned outputs, the shapes of
Qwen3-Next and odd ones; its rows and batches computed independently, bit for bit."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import gated_delta as mlx_gd

from mtp_splitk import gated_delta, launch, patch, plan as planner
from _stand_ins import gated_delta_by_ops

pytestmark = pytest.mark.gpu

# (B, T, Hk, Hv, dk, dv): Qwen3-Next-80B-A3B's layer (16 key heads, 32 value heads, 128 wide),
# the synthetic "small" width, and odd ones.
SHAPES = [(1, 1, 16, 32, 128, 128), (1, 4, 16, 32, 128, 128), (2, 5, 16, 32, 128, 128),
          (1, 3, 2, 4, 64, 64), (3, 7, 4, 4, 256, 96), (1, 2, 1, 3, 32, 40)]


def inputs(B, T, Hk, Hv, dk, dv, dtype=mx.bfloat16, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, T, Hk, dk)) / math.sqrt(dk)
    k = mx.random.normal((B, T, Hk, dk)) / math.sqrt(dk)
    v = mx.random.normal((B, T, Hv, dv))
    g = mx.exp(-mx.random.uniform(0.0, 1.0, (B, T, Hv)))
    beta = mx.sigmoid(mx.random.normal((B, T, Hv))).astype(dtype)
    state = mx.random.normal((B, Hv, dv, dk)) * 0.1
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, state


def rel(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
def test_gpu_kernel_matches_mlx_lms_ops(shape, dtype):
    args = inputs(*shape, dtype=dtype)
    y_ref, states_ref = gated_delta_by_ops(*args)
    y, states = launch.gated_delta(*args, all_states=True, poison=math.nan)
    _, last = launch.gated_delta(*args, all_states=False, poison=math.nan)
    mx.eval(y, states, last)
    for out in (y, states, last):
        assert not np.isnan(np.array(out.astype(mx.float32))).any(), "unwritten (NaN-poisoned) or NaN outputs"
    assert y.dtype == dtype and states.shape == (shape[1], *args[-1].shape) and last.shape == (1, *args[-1].shape)
    assert rel(states, states_ref) < 1e-5  # float32 state: the sums' order only
    assert rel(y, y_ref) < (1e-2 if dtype == mx.bfloat16 else 3e-3)
    assert mx.array_equal(last[0], states[-1])


def test_gpu_rows_and_batches_are_computed_independently():
    """T rows in one launch are T launches of one row, and each batch row is its
    own call's, bit for bit: a verify row is the patched decode step's row."""
    q, k, v, g, beta, state = inputs(2, 5, 16, 32, 128, 128, seed=1)
    y, states = launch.gated_delta(q, k, v, g, beta, state, all_states=True)
    s = state
    for t in range(5):
        row = slice(t, t + 1)
        y1, s = launch.gated_delta(q[:, row], k[:, row], v[:, row], g[:, row], beta[:, row], s, all_states=False)
        s = s[0]
        assert mx.array_equal(y1, y[:, row]) and mx.array_equal(s, states[t]), t
    y0, states0 = launch.gated_delta(q[:1], k[:1], v[:1], g[:1], beta[:1], state[:1], all_states=True)
    assert mx.array_equal(y0, y[:1]) and mx.array_equal(states0, states[:, :1])


def test_gpu_patched_update_is_mlx_lms_within_rounding(monkeypatch):
    """gated_delta.update under the patch (the kernel) against mlx-lm's own
    gated_delta_update from the same a, b, A_log, dt_bias."""
    mx.random.seed(2)
    B, T, Hk, Hv, dk, dv = 1, 4, 16, 32, 128, 128
    q, k, v, _, _, state = inputs(B, T, Hk, Hv, dk, dv, seed=2)
    a, b = (mx.random.normal((B, T, Hv)).astype(mx.bfloat16) for _ in range(2))
    A_log, dt_bias = mx.random.normal((Hv,)) * 0.5, mx.random.normal((Hv,)).astype(mx.bfloat16)
    y_ref, final_ref = mlx_gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    monkeypatch.delenv("MTP_SPLITK_GATED_DELTA", raising=False)  # on by default
    assert planner.plan_gated_delta(Hk, Hv, dk, q.dtype, planner.current_device())
    with patch.enabled():
        y, final = gated_delta.update(q, k, v, a, b, A_log, dt_bias, state)
        y_rows, states = gated_delta.rows(q, k, v, a, b, A_log, dt_bias, state)
    assert rel(final, final_ref) < 1e-5 and rel(y, y_ref) < 1e-2
    assert mx.array_equal(y_rows, y) and mx.array_equal(states[-1], final)
