# Copyright © 2026 mtp_splitk contributors

"""kernels/gated_delta.cu compiled with g++ through a small CUDA shim
(tests/cuda_shim/) and run on the CPU, as launch.gated_delta builds its call
(the body mx.fast.cuda_kernel would wrap, its grid and outputs): against
mlx-lm's ops one row at a time, NaN-poisoned outputs, and rows and batches
computed independently bit for bit. It checks the kernel's C++ and algorithm,
not NVRTC or a GPU (tests/test_gated_delta_gpu.py does that on the device)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mtp_splitk import launch
from _cuda_shim import emulate
from _stand_ins import gated_delta_by_ops

# (name, B, T, Hk, Hv, dk, dv, dtype)
CASES = [
    ("bf16_dk64", 1, 3, 2, 4, 64, 64, mx.bfloat16),
    ("bf16_two_batches", 2, 4, 1, 2, 128, 16, mx.bfloat16),
    ("f16_dk256_odd_heads", 1, 2, 1, 3, 256, 8, mx.float16),
    ("bf16_dk32_one_row", 3, 1, 2, 2, 32, 12, mx.bfloat16),
]


def inputs(B, T, Hk, Hv, dk, dv, dtype, seed):
    mx.random.seed(seed)
    q = (mx.random.normal((B, T, Hk, dk)) / math.sqrt(dk)).astype(dtype)
    k = (mx.random.normal((B, T, Hk, dk)) / math.sqrt(dk)).astype(dtype)
    v = mx.random.normal((B, T, Hv, dv)).astype(dtype)
    g = mx.exp(-mx.random.uniform(0.0, 1.0, (B, T, Hv)))
    beta = mx.sigmoid(mx.random.normal((B, T, Hv))).astype(dtype)
    state = mx.random.normal((B, Hv, dv, dk)) * 0.1
    return [q, k, v, g, beta, state]


def _emulate(requests, workdir):
    """Each request (the arguments of launch.gated_delta) through the g++-built kernel."""
    def launches():
        for args, all_states in requests:
            launch.gated_delta(*args, all_states=all_states)

    return emulate(launches, workdir, "gated_delta")


def _rel(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """Every case with all its states and with the last only; then the two-batch
    case's first row alone and its first batch alone."""
    requests, index = [], {}
    for n, (name, *shape) in enumerate(CASES):
        args = inputs(*shape, seed=n)
        index[name] = (args, len(requests))
        requests += [(args, True), (args, False)]
    args, _ = index["bf16_two_batches"]
    q, k, v, g, beta, state = args
    # Row 0 alone, and batch 0 alone: each must be the whole call's, bit for bit.
    requests.append(([q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], state], False))
    requests.append(([a[:1] for a in args], True))
    return index, requests, _emulate(requests, str(tmp_path_factory.mktemp("gated_delta")))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_emulated_kernel_matches_mlx_lms_ops(emulated, name):
    index, _, outputs = emulated
    args, at = index[name]
    (y, states), (y_last, last) = outputs[at], outputs[at + 1]
    for out in (y, states, y_last, last):
        assert not np.isnan(np.array(out.astype(mx.float32))).any(), "unwritten (NaN-poisoned) outputs"
    y_ref, states_ref = gated_delta_by_ops(*args)
    assert _rel(states, states_ref) < 1e-5  # float32: the sums' order only
    assert _rel(y, y_ref) < (1e-2 if args[0].dtype == mx.bfloat16 else 3e-3)
    assert mx.array_equal(y_last, y) and mx.array_equal(last[0], states[-1])


def test_emulated_rows_and_batches_are_independent(emulated):
    index, requests, outputs = emulated
    _, at = index["bf16_two_batches"]
    y, states = outputs[at]
    y_row0, s_row0 = outputs[-2]
    assert mx.array_equal(y_row0, y[:, :1]) and mx.array_equal(s_row0[0], states[0])
    y_b0, states_b0 = outputs[-1]
    assert mx.array_equal(y_b0, y[:1]) and mx.array_equal(states_b0, states[:, :1])
