# Copyright © 2026 mtp_splitk contributors

"""The kernel path on the CPU: a pretend GPU for the planner, and MLX's ops
standing in for the kernel launches (tests/test_ops.py, tests/test_patch.py)."""

import mlx.core as mx

from mtp_splitk import launch, ops, plan as planner


def pretend_gpu(monkeypatch, name="pretend GPU"):
    """The planner believes it is on a CUDA device (with ``plan.split(n)``
    it then plans the kernels for every M <= 64)."""
    gpu = planner.Device("cuda", name, 132)
    monkeypatch.setattr(planner, "current_device", lambda: gpu)
    ops.clear_cache()
    monkeypatch.setattr(ops, "_calls", {})  # nothing of the pretend device survives the test
    return gpu


def stand_in_kernels(monkeypatch, launched: list):
    """launch.dense / launch.gather computed by MLX's ops, behind
    stop_gradient: like a custom kernel they have no derivative of their
    own, so a correct gradient can only come from the op's custom vjp/jvp.
    Each launch appends its kind to ``launched``."""

    def dense(plan, x, w, scales, biases, poison=None):
        launched.append("dense")
        y = mx.quantized_matmul(x, w, scales, biases, True, plan.group_size, plan.bits, plan.mode)
        return mx.stop_gradient(y)

    def gather(plan, x, w, scales, biases, idx, x_div, poison=None):
        launched.append("gather")
        rows = x[mx.arange(idx.size) // x_div][:, None, :]
        y = mx.gather_qmm(
            rows, w, scales, biases, rhs_indices=idx, transpose=True,
            group_size=plan.group_size, bits=plan.bits, mode=plan.mode,
        )
        return mx.stop_gradient(y.reshape(idx.size, -1))

    monkeypatch.setattr(launch, "dense", dense)
    monkeypatch.setattr(launch, "gather", gather)


def gated_delta_by_ops(q, k, v, g, beta, state):
    """The Gated DeltaNet recurrence as mlx-lm's ops compute it, one row at a time
    (what kernels/gated_delta.cu computes, up to the sums' order): (y, every row's state)."""
    from mlx_lm.models.gated_delta import gated_delta_ops

    ys, states = [], []
    for t in range(q.shape[1]):
        row = slice(t, t + 1)
        y, state = gated_delta_ops(q[:, row], k[:, row], v[:, row], g[:, row], beta[:, row], state)
        ys.append(y)
        states.append(state)
    return mx.concatenate(ys, axis=1), mx.stack(states)
