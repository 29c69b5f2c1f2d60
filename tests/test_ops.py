"""The op on the CPU: MLX's result bit for bit, and a clear error for bad input."""

import mlx.core as mx
import pytest

from mtp_splitk import gather_qmm, quantized_matmul

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
