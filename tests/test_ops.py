"""The op on the CPU: MLX's result bit for bit, and a clear error for bad input."""

import subprocess
import sys
import tempfile
import textwrap

import mlx.core as mx
import pytest

from mtp_splitk import gather_qmm, quantized_matmul

from _stand_ins import pretend_gpu, stand_in_kernels

CASES = [("affine", 4, 64), ("affine", 3, 32), ("affine", 8, 128), ("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)]


def weights(N, K, mode, bits, group_size, dtype=mx.float32, E=None):
    shape = (N, K) if E is None else (E, N, K)
    parts = mx.quantize((mx.random.normal(shape) * 0.1).astype(dtype), group_size, bits, mode=mode)
    return parts[0], parts[1], (parts[2] if mode == "affine" else None)


@pytest.mark.parametrize("mode,bits,group_size", CASES)
@pytest.mark.parametrize("x_shape", [(5, 256), (2, 3, 256), (256,)])
def test_fallback_is_bit_identical(mode, bits, group_size, x_shape):
    wq, s, b = weights(96, 256, mode, bits, group_size)
    x = mx.random.normal(x_shape)
    ours = quantized_matmul(x, wq, s, b, True, group_size, bits, mode)
    theirs = mx.quantized_matmul(x, wq, s, b, True, group_size, bits, mode)
    assert ours.shape == theirs.shape and mx.array_equal(ours, theirs).item()


def test_defaults_follow_mlx():
    wq, s, b = weights(64, 128, "affine", 4, 64)
    x = mx.random.normal((2, 128))
    assert mx.array_equal(quantized_matmul(x, wq, s, b), mx.quantized_matmul(x, wq, s, b)).item()


def test_transpose_false_falls_back():
    # w packed along N for x @ w: MLX's layout for transpose=False.
    w = mx.random.normal((128, 64))
    wq, s, b = mx.quantize(w.T, 64, 4)  # quantized along the last dim of (64, 128)
    x = mx.random.normal((3, 64))
    ours = quantized_matmul(x, wq, s, b, transpose=False)
    assert mx.array_equal(ours, mx.quantized_matmul(x, wq, s, b, transpose=False)).item()


@pytest.mark.parametrize("mode,bits,group_size", CASES[:4])
@pytest.mark.parametrize("sorted_indices", [False, True])
def test_gather_fallback_is_bit_identical(mode, bits, group_size, sorted_indices):
    E, N, K = 8, 64, 128
    wq, s, b = weights(N, K, mode, bits, group_size, E=E)
    x = mx.random.normal((6, 1, 1, K))
    idx = mx.random.randint(0, E, (6, 2)).astype(mx.uint32)
    if sorted_indices:
        order = mx.argsort(idx.flatten())
        x, idx = x.reshape(6, 1, K)[order // 2], idx.flatten()[order]
    kw = dict(rhs_indices=idx, transpose=True, group_size=group_size, bits=bits, mode=mode,
              sorted_indices=sorted_indices)
    ours = gather_qmm(x, wq, s, b, **kw)
    theirs = mx.gather_qmm(x, wq, s, b, **kw)
    assert mx.array_equal(ours, theirs).item()


def test_errors_name_the_problem():
    wq, s, b = weights(64, 128, "affine", 4, 64)
    x = mx.random.normal((2, 128))
    with pytest.raises(ValueError, match="x has 100 features"):
        quantized_matmul(mx.random.normal((2, 100)), wq, s, b)
    with pytest.raises(ValueError, match="group_size=48"):
        quantized_matmul(x, wq, s, b, group_size=48)
    with pytest.raises(ValueError, match="bits=7"):
        quantized_matmul(x, wq, s, b, bits=7)
    with pytest.raises(ValueError, match="packed uint32"):
        quantized_matmul(x, wq.astype(mx.int32), s, b)
    with pytest.raises(ValueError, match="Unknown quantization mode"):
        quantized_matmul(x, wq, s, b, mode="int4")
    with pytest.raises(ValueError, match="needs biases"):
        quantized_matmul(x, wq, s, None)
    with pytest.raises(ValueError, match="scales shape"):
        quantized_matmul(x, wq, s[:, :1], b[:, :1])
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        quantized_matmul(x.astype(mx.int32), wq, s, b)
    fq, fs, _ = weights(64, 128, "mxfp4", 4, 32)
    with pytest.raises(ValueError, match="takes no biases"):
        quantized_matmul(x, fq, fs, b, mode="mxfp4")
    with pytest.raises(ValueError, match="uint8 scales"):
        quantized_matmul(x, fq, fs.astype(mx.float32), mode="mxfp4")
    with pytest.raises(ValueError, match="global_scale"):
        gather_qmm(x, wq[None], s[None], b[None], global_scale=mx.array(1.0))
    with pytest.raises(ValueError, match="rhs_indices must be integer"):
        gather_qmm(x, wq[None], s[None], b[None], rhs_indices=mx.array([0.5]))


def test_cached_decisions_follow_every_part_of_the_call(monkeypatch):
    """The op caches its checks and plan per call signature: a call that
    differs in any part the plan depends on (biases dtype, scales shape,
    device) is decided afresh, never served a stale plan."""
    from mtp_splitk import launch, ops, plan as planner

    h200, cpu = planner.Device("cuda", "NVIDIA H200", 132), planner.Device("cpu", "cpu", 0)
    device = [h200]
    monkeypatch.setattr(planner, "current_device", lambda: device[0])
    launched = []

    def fake_dense(p, x, w, scales, biases, poison=None):
        launched.append(p)
        return mx.zeros((x.shape[0], p.N), x.dtype)

    monkeypatch.setattr(launch, "dense", fake_dense)
    ops.clear_cache()
    try:
        wq, s, b = weights(4096, 4096, "affine", 4, 64, dtype=mx.bfloat16)
        x = mx.random.normal((3, 4096)).astype(mx.bfloat16)
        quantized_matmul(x, wq, s, b)
        assert len(launched) == 1  # the H200 table plans 4096 x 4096 at M = 3
        # Biases in another type than the scales: MLX takes them, the kernel would not.
        mixed = quantized_matmul(x, wq, s, b.astype(mx.float32))
        assert len(launched) == 1 and mx.array_equal(mixed, mx.quantized_matmul(x, wq, s, b.astype(mx.float32))).item()
        with pytest.raises(ValueError, match="scales shape"):
            quantized_matmul(x, wq, s[:, :1], b[:, :1])
        device[0] = cpu
        quantized_matmul(x, wq, s, b)
        assert len(launched) == 1
        device[0] = h200
        quantized_matmul(x, wq, s, b)
        assert len(launched) == 2
    finally:
        ops.clear_cache()


# -- ops.recording -------------------------------------------------------------------------


def test_recording_lists_every_call_with_its_plan():
    from mtp_splitk import ops

    wq, s, b = weights(96, 256, "affine", 4, 64)
    x = mx.random.normal((2, 3, 256))
    E, N, K = 4, 64, 128
    gq, gs, gb = weights(N, K, "affine", 4, 64, E=E)
    idx = mx.array([[0, 3], [1, 1], [2, 0]], dtype=mx.uint32)
    quantized_matmul(x, wq, s, b)  # outside a block: not recorded
    with ops.recording() as calls:
        quantized_matmul(x, wq, s, b)
        with ops.recording() as inner:
            quantized_matmul(x[0], wq, s, b)  # nested blocks each see the call
        gather_qmm(mx.random.normal((3, 1, 1, K)), gq, gs, gb, rhs_indices=idx)
        with pytest.raises(ValueError):
            quantized_matmul(mx.random.normal((2, 100)), wq, s, b)  # failed calls are not listed
    quantized_matmul(x, wq, s, b)
    # On the CPU the planner plans nothing: MLX's op took every call (plan None).
    assert calls == [
        ops.Call("quantized_matmul", 6, 96, 256, None),
        ops.Call("quantized_matmul", 3, 96, 256, None),
        ops.Call("gather_qmm", 6, N, K, None),  # 3 tokens x 2 experts
    ]
    assert inner == [ops.Call("quantized_matmul", 3, 96, 256, None)]
    assert ops._recording is None  # the hot path's one check is back to None


def test_recording_shows_the_planned_kernel(monkeypatch):
    """A pretend GPU with a forced split: the kernel's plan is what is listed."""
    from mtp_splitk import ops, plan as planner

    pretend_gpu(monkeypatch)
    stand_in_kernels(monkeypatch, [])
    wq, s, b = weights(256, 512, "affine", 4, 64, dtype=mx.bfloat16)
    x = mx.random.normal((5, 512)).astype(mx.bfloat16)
    with planner.split(4), ops.recording() as calls:
        quantized_matmul(x, wq, s, b)
        quantized_matmul(x.astype(mx.float32), wq, s, b)  # float32 stays on MLX's path
    (kernel, fallback) = calls
    assert kernel.plan is not None
    assert (kernel.plan.warps_k, kernel.plan.N, kernel.plan.K) == (4, 256, 512)
    assert (kernel.M, kernel.N, kernel.K) == (5, 256, 512)
    assert fallback.plan is None


# -- a global swap: mx.quantized_matmul = mtp_splitk.quantized_matmul --------------------


def test_global_swap_of_mlx_ops_does_not_recurse():
    """The fallback calls the MLX ops bound at import, not whatever
    ``mx.quantized_matmul`` names now. In a subprocess: the swap is global."""
    script = textwrap.dedent(
        """
        import sys
        import mlx.core as mx
        import mlx.nn as nn
        import mtp_splitk
        from mtp_splitk import ops, synthetic

        mlx_qmm, mlx_gather = mx.quantized_matmul, mx.gather_qmm
        mx.quantized_matmul, mx.gather_qmm = mtp_splitk.quantized_matmul, mtp_splitk.gather_qmm
        sys.setrecursionlimit(200)  # a recursing fallback fails fast
        wq, s, b = mx.quantize(mx.random.normal((64, 128)), 64, 4)
        x = mx.random.normal((3, 128))
        assert mx.array_equal(mx.quantized_matmul(x, wq, s, b), mlx_qmm(x, wq, s, b)).item()
        gq, gs, gb = mx.quantize(mx.random.normal((4, 64, 128)), 64, 4)
        idx = mx.array([[0, 3], [1, 1], [2, 0]], dtype=mx.uint32)
        gx = mx.random.normal((3, 1, 1, 128))
        ours = mx.gather_qmm(gx, gq, gs, gb, rhs_indices=idx)
        assert mx.array_equal(ours, mlx_gather(gx, gq, gs, gb, rhs_indices=idx)).item()

        import mlx_lm
        model, _ = mlx_lm.load(str(synthetic.write_model(sys.argv[1], "qwen3_moe", "tiny")))
        tokens = mx.array([[1, 2, 3, 4]])
        with ops.recording() as swapped:
            expected = model(tokens)  # unpatched: MLX's layers call the swapped names
        with mtp_splitk.enabled(), ops.recording() as patched:
            got = model(tokens)
        assert swapped and len(patched) == len(swapped)
        assert mx.array_equal(expected, got).item()
        print("ok", len(swapped))
        """
    )
    with tempfile.TemporaryDirectory() as d:
        result = subprocess.run(
            [sys.executable, "-c", script, d], capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


# -- transforms through the kernel path ----------------------------------------------------


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 64), ("mxfp4", 4, 32)])
def test_kernel_path_has_mlx_derivatives(monkeypatch, mode, bits, group_size):
    """With the kernel planned (pretend GPU, forced split) mx.grad and mx.jvp
    give MLX's op's derivatives bit for bit, and mx.vmap fails as MLX's does."""
    from mtp_splitk import plan as planner

    pretend_gpu(monkeypatch)
    launched = []
    stand_in_kernels(monkeypatch, launched)
    wq, s, b = weights(256, 512, mode, bits, group_size, dtype=mx.bfloat16)
    x = mx.random.normal((2, 3, 512)).astype(mx.bfloat16)
    r = mx.random.normal((2, 3, 256)).astype(mx.bfloat16)
    affine = mode == "affine"
    tangent = r[..., :1] * x

    def op(qmm, x):
        return qmm(x, wq, s, b, True, group_size, bits, mode)

    def loss(op):
        if affine:
            return lambda x, s, b: (op(x, wq, s, b, True, group_size, bits, mode) * r).sum()
        return lambda x: (op(x, wq, s, None, True, group_size, bits, mode) * r).sum()

    args, argnums = ((x, s, b), (0, 1, 2)) if affine else ((x,), 0)
    with planner.split(4):
        ours = mx.grad(loss(quantized_matmul), argnums=argnums)(*args)
        assert launched == ["dense"]
        ours_jvp = mx.jvp(lambda x: op(quantized_matmul, x), [x], [tangent])
        with pytest.raises(Exception) as ours_vmap:
            mx.vmap(lambda x: op(quantized_matmul, x))(x)
    theirs = mx.grad(loss(mx.quantized_matmul), argnums=argnums)(*args)
    for a, t in zip(ours if affine else [ours], theirs if affine else [theirs]):
        assert a.dtype == t.dtype and mx.array_equal(a, t).item()
    theirs_jvp = mx.jvp(lambda x: op(mx.quantized_matmul, x), [x], [tangent])
    assert mx.array_equal(ours_jvp[0][0], theirs_jvp[0][0]).item()
    assert mx.array_equal(ours_jvp[1][0], theirs_jvp[1][0]).item()
    assert mx.abs(theirs_jvp[1][0]).sum().item() > 0  # a real tangent, not zeros
    with pytest.raises(Exception) as theirs_vmap:
        mx.vmap(lambda x: op(mx.quantized_matmul, x))(x)
    assert str(ours_vmap.value) == str(theirs_vmap.value)


@pytest.mark.parametrize("sorted_indices", [False, True])
def test_grouped_kernel_path_has_mlx_derivatives(monkeypatch, sorted_indices):
    from mtp_splitk import plan as planner

    pretend_gpu(monkeypatch)
    launched = []
    stand_in_kernels(monkeypatch, launched)
    E, N, K = 4, 256, 512
    wq, s, b = weights(N, K, "affine", 4, 64, dtype=mx.bfloat16, E=E)
    idx = mx.array([[0, 3], [1, 1], [2, 0]], dtype=mx.uint32)
    x = mx.random.normal((3, 1, 1, K)).astype(mx.bfloat16)
    if sorted_indices:
        order = mx.argsort(idx.flatten())
        x, idx = x.reshape(3, 1, K)[order // 2], idx.flatten()[order]
    r = mx.random.normal((*idx.shape, 1, N)).astype(mx.bfloat16)
    kw = dict(rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=sorted_indices)

    def loss(op):
        return lambda x: (op(x, wq, s, b, **kw) * r).sum()

    # With respect to x only: MLX's CPU gradient of the scales of a gather
    # needs float32 (GatherMM), and the planner plans half precision only.
    with planner.split(4):
        ours = mx.grad(loss(gather_qmm))(x)
    assert launched == ["gather"]
    theirs = mx.grad(loss(mx.gather_qmm))(x)
    assert ours.dtype == theirs.dtype and mx.array_equal(ours, theirs).item()
    assert mx.abs(theirs).sum().item() > 0


def test_patched_layers_take_derivatives_in_training_mode_only(monkeypatch):
    """mlx-lm loads models in eval mode: their kernel calls are the bare
    kernels (no mx.custom_function, which costs inference time); a layer in
    training mode (mlx-lm's LoRA trainer calls model.train()) gets MLX's
    derivatives, and its gradient is MLX's."""
    import mlx.nn as nn

    import mtp_splitk
    from mtp_splitk import plan as planner

    pretend_gpu(monkeypatch)
    wrapped = []
    custom_function = mx.custom_function
    monkeypatch.setattr(mx, "custom_function", lambda f: wrapped.append(f) or custom_function(f))
    launched = []
    stand_in_kernels(monkeypatch, launched)
    layer = nn.QuantizedLinear(512, 256, bias=False)
    layer.update({k: v.astype(mx.bfloat16) for k, v in layer.parameters().items() if k != "weight"})
    x = mx.random.normal((3, 512)).astype(mx.bfloat16)
    with planner.split(4), mtp_splitk.enabled():
        layer.eval()
        inference = layer(x)
        assert wrapped == []
        layer.train()
        grad = mx.grad(lambda x: layer(x).sum())(x)
        assert len(wrapped) == 1 and launched == ["dense", "dense"]
    expected = mx.grad(lambda x: layer(x).sum())(x)  # unpatched: MLX's op
    assert mx.array_equal(inference, layer(x)).item()
    assert mx.array_equal(grad, expected).item() and mx.abs(grad).sum().item() > 0
