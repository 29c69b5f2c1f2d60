# Copyright © 2026 mtp_splitk contributors

"""The patch's routes (a layer's calls that MLX takes skip the ops, by the
planner's answer) and transforms through patched layers (MLX's gradients on
its own path and on the kernel path)."""

import contextlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map
from mlx_lm.models import switch_layers

import mtp_splitk
from mtp_splitk import ops, plan

from _stand_ins import pretend_gpu, stand_in_kernels


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach mtp_splitk.ops.quantized_matmul."""
    calls = []
    original = ops.quantized_matmul

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    ops.clear_cache()
    monkeypatch.setattr(ops, "quantized_matmul", counting)
    return calls


# -- routing: MLX's calls past the ops --------------------------------------------------------


def _half_linear(N, K, dtype=mx.bfloat16):
    layer = nn.QuantizedLinear(K, N, bias=False)
    layer.update(
        tree_map(lambda p: p.astype(dtype) if p.dtype == mx.float32 else p, layer.parameters())
    )
    return layer


def test_routes_follow_the_planner(monkeypatch, spy):
    """A layer remembers the planner's answer for an input, for the current
    split policy, device and decisions (ops.clear_cache): a change of any of
    them asks again; later calls skip the ops, to MLX's op or the kernel's."""
    pretend_gpu(monkeypatch, "NVIDIA H200")  # its table: MLX's op for 2048 x 4096 at M = 1
    launched = []
    stand_in_kernels(monkeypatch, launched)
    layer = _half_linear(2048, 4096)
    x = mx.random.normal((1, 1, 4096)).astype(mx.bfloat16)
    expected = layer(x)

    def calls(n=2):
        for _ in range(n):
            assert mx.array_equal(layer(x), expected)
        return len(spy), len(launched)

    with mtp_splitk.enabled():
        assert calls() == (1, 0)  # asked once; then the original method
        with plan.split(4):
            assert calls() == (2, 2)  # the forced split: the kernel, asked once, then called directly
        assert calls() == (3, 2)  # back to MLX's op: asked again, once
        ops.clear_cache()
        assert calls() == (4, 2)
        cpu = plan.Device("cpu", "cpu", 0)
        monkeypatch.setattr(plan, "current_device", lambda: cpu)
        assert calls() == (5, 2)
        assert calls(1) == (5, 2)


@pytest.mark.parametrize("bias", [False, True])
def test_a_direct_kernel_call_is_the_ops_call(monkeypatch, spy, bias):
    """The route straight to the kernel op gives what the ops give, and hands
    the call back to them when what the op was built for changes: the
    layer's mode (derivatives) or x's dtype (bfloat16 and float16 share a route)."""
    pretend_gpu(monkeypatch, "NVIDIA H200")
    launched = []
    stand_in_kernels(monkeypatch, launched)
    layer = _half_linear(4096, 4096)
    if bias:
        layer.bias = mx.random.normal((4096,)).astype(mx.bfloat16)
    layer.eval()
    x = mx.random.normal((1, 5, 4096)).astype(mx.bfloat16)  # M = 5: the H200 table's kernel
    half = x.astype(mx.float16)
    unpatched_half = layer(half)  # float16 x, bfloat16 scales: MLX's op promotes
    with mtp_splitk.enabled():
        with ops.recording() as recorded:
            expected = layer(x)  # through the ops: recorded calls never route
        assert recorded[0].plan is not None and len(spy) == 1
        assert mx.array_equal(layer(x), expected) and len(spy) == 2  # the route is made
        assert mx.array_equal(layer(x), expected) and len(spy) == 2 and len(launched) == 3
        assert mx.array_equal(layer(half), unpatched_half) and len(spy) == 3
        layer.train()
        assert mx.array_equal(layer(x), expected)
        assert len(spy) == 4  # training mode: the ops again (a kernel op with derivatives)
    assert mx.array_equal(layer(x), expected)  # unpatched: MLX's op (the stand-in computes it)


def test_routes_key_on_item_size_because_the_planner_does():
    """The router keys x by its item size, not its dtype (cheaper): that is
    exact only while the planner answers bfloat16 and float16 alike."""
    devices = [plan.Device("cuda", "NVIDIA H200", 132), plan.Device("metal", "pretend", 10)]
    plans = {}
    for device, split in [(d, s) for d in devices for s in (None, 4)]:
        with plan.split(split):
            for M in (1, 3, 5, 8, 64):
                for N, K in ((4096, 4096), (2048, 768), (151936, 2048)):
                    for t in (mx.bfloat16, mx.float16):
                        dense = plan.plan_dense(M, N, K, 4, 64, "affine", t, device)
                        gather = plan.plan_gather(8 * M, 8, N, K, 4, 64, "affine", t, device)
                        plans.setdefault((device, split, M, N, K), set()).add((dense, gather))
    assert all(len(answers) == 1 for answers in plans.values())
    assert any(dense is not None for answers in plans.values() for dense, _ in answers)


# -- transforms ----------------------------------------------------------------------------


def _layer_gradients():
    """A function computing gradients through a bfloat16 QuantizedLinear (x,
    scales, biases) and QuantizedSwitchLinear (x). The cotangents of the
    layers' outputs are fixed, so the gradients do not depend on how the
    forward rounded."""
    K, N, E = 512, 256, 4
    linear = _half_linear(N, K)
    linear.unfreeze(keys=["scales", "biases"])
    experts = switch_layers.QuantizedSwitchLinear(K, N, E, bias=False)
    experts.update(
        tree_map(
            lambda p: p.astype(mx.bfloat16) if p.dtype == mx.float32 else p,
            experts.parameters(),
        )
    )
    x = mx.random.normal((3, 1, 1, K)).astype(mx.bfloat16)
    idx = mx.array([[0, 3], [1, 1], [2, 0]], dtype=mx.uint32)
    r_linear = mx.random.normal((3, 1, 1, N)).astype(mx.bfloat16)
    r_experts = mx.random.normal((3, 2, 1, N)).astype(mx.bfloat16)

    def grads():
        by_params = nn.value_and_grad(linear, lambda x: (linear(x) * r_linear).sum())(x)[1]
        by_x = mx.grad(
            lambda x: (linear(x) * r_linear).sum() + (experts(x, idx) * r_experts).sum()
        )(x)
        return [by_x, by_params["scales"], by_params["biases"]]

    return grads


@pytest.mark.parametrize("path", ["routed", "recorded", "kernel"])
def test_gradients_through_patched_layers_equal_mlx(monkeypatch, path):
    """mx.grad through a patched QuantizedLinear and QuantizedSwitchLinear
    equals the unpatched gradient bit for bit: on the CPU's own path (MLX's
    op takes the call; routed past the ops, or through them while recorded)
    and on the kernel path (pretend GPU, forced split, stand-in kernels that
    have no derivative of their own: the op's vjp gives it)."""
    launched = []
    if path == "kernel":
        pretend_gpu(monkeypatch)
        stand_in_kernels(monkeypatch, launched)
    grads = _layer_gradients()
    expected = grads()
    with plan.split(4 if path == "kernel" else None), mtp_splitk.enabled():
        grads()  # the first calls decide the routes
        with ops.recording() if path == "recorded" else contextlib.nullcontext() as calls:
            patched = grads()
    if path == "kernel":
        assert {"dense", "gather"} <= set(launched)
    if path == "recorded":
        assert len(calls) >= 3 and all(c.plan is None for c in calls)
    for a, b in zip(patched, expected):
        assert a.dtype == b.dtype and mx.array_equal(a, b)
        assert mx.abs(b.astype(mx.float32)).sum().item() > 0



@pytest.mark.gpu
def test_gpu_gradients_through_the_kernels_equal_mlx(monkeypatch):
    """With the kernels forced, gradients through patched layers are MLX's
    (its vjp, the kernels' forward), bit for bit."""
    from mtp_splitk import launch

    launched = []
    for kind in ("dense", "gather"):
        real = getattr(launch, kind)
        def counted(*args, _real=real, _kind=kind, **kwargs):
            launched.append(_kind)
            return _real(*args, **kwargs)

        monkeypatch.setattr(launch, kind, counted)
    grads = _layer_gradients()
    expected = grads()
    with plan.split(4), mtp_splitk.enabled():
        patched = grads()
    assert {"dense", "gather"} <= set(launched), "the kernels did not take the calls"
    for a, b in zip(patched, expected):
        assert a.dtype == b.dtype and mx.array_equal(a, b)
