# Copyright © 2026 mtp_splitk contributors

"""Stored tensors of real-shape models, synthesized in packed form.

Only the shapes and dtypes of a lazy model's parameters are used: packed
uint32 words, scales and biases are streamed from small random pools, so a
30B-parameter directory costs disk bandwidth, not compute or RAM.
"""

import hashlib
import math
from typing import Dict, Iterator, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .safetensors import STORED_DTYPES, Tensor, tensor_from_array, to_stored

CHUNK = 1 << 21  # elements per write when streaming
POOL = 1 << 22  # random values per pool; chunks are slices of it at random offsets
SMALL = 1 << 20  # float tensors up to this size keep mlx-lm's own initial values

_FP4_MAGNITUDES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def _e4m3_values() -> np.ndarray:
    """The value of every fp8 E4M3 code (NaN for 0x7F and 0xFF)."""
    codes = np.arange(256)
    exp, man = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return np.where(codes & 0x80, -mag, mag)


def _rms(values) -> float:
    return float(np.sqrt(np.nanmean(np.square(values))))


class _Pools:
    """Random value pools shared by all tensors of one model.

    Generating fresh random numbers for 30B weights would take minutes on a
    few CPU cores; slicing pools at random offsets (and XOR-ing packed words
    with a random key) costs a memory copy. The model's numerics do not care,
    the bandwidth a benchmark measures does not either.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.cache = {}

    def rng(self, *key) -> np.random.Generator:
        # Not hash(): Python salts string hashes per process.
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest, "little")])

    def get(self, key, make):
        if key not in self.cache:
            self.cache[key] = make(self.rng("pool", *key))
        return self.cache[key]

    def stream(self, pool, n, rng, xor=False, fix=None) -> Iterator[np.ndarray]:
        done = 0
        while done < n:
            size = min(CHUNK, n - done)
            start = int(rng.integers(0, len(pool) - size + 1))
            chunk = pool[start : start + size]
            if xor:
                chunk = chunk ^ pool.dtype.type(rng.integers(0, 2**32))
            if fix is not None:
                chunk = fix(chunk)
            yield chunk
            done += size


def _no_fp8_nan(words: np.ndarray) -> np.ndarray:
    """Turn the E4M3 NaN bytes (0x7F, 0xFF) into the largest finite values."""
    b = words.view(np.uint8).copy()
    b[(b & 0x7F) == 0x7F] ^= 1
    return b.view(np.uint32)


def _packed_tensors(prefix, module, params, pools: _Pools) -> List[Tensor]:
    """Stored tensors of one quantized layer, values drawn from ``pools``.

    Weights are uniformly random codes. Scales (and affine biases) are chosen
    so that the dequantized weights have the spread of mlx-lm's own
    initialisation, uniform in +-1/sqrt(K), so activations stay finite.
    """
    mode, bits, group_size = module.mode, module.bits, module.group_size
    scales = params["scales"]
    K = scales.shape[-1] * group_size
    amplitude = 1 / math.sqrt(K)
    rng = lambda leaf: pools.rng(prefix, leaf)  # noqa: E731
    out = []

    w = params["weight"]
    words = pools.get(("words",), lambda r: r.integers(0, 2**32, POOL, np.uint32))
    fix = _no_fp8_nan if mode == "mxfp8" else None
    out.append(_streamed(prefix + ".weight", w, pools, words, rng("w"), xor=True, fix=fix))

    if mode == "affine":
        stored = STORED_DTYPES[scales.dtype][0]
        levels = 2**bits - 1

        def make_scale(r):
            jitter = r.uniform(0.75, 1.25, POOL).astype(np.float32)
            return jitter * np.float32(2 * amplitude / levels)

        scale_pool = pools.get(("scale", K, bits), make_scale)
        # Each group's bias centres its codes on zero: w = s * (q - levels / 2).
        s = pools.get(("scale", K, bits, stored), lambda r: to_stored(scale_pool, stored))
        b = pools.get(
            ("bias", K, bits, stored),
            lambda r: to_stored(-scale_pool * np.float32(levels / 2), stored),
        )
        # The same offsets for scales and biases keep each group's pair together.
        out.append(_streamed(prefix + ".scales", scales, pools, s, rng("s")))
        out.append(_streamed(prefix + ".biases", params["biases"], pools, b, rng("s")))
    else:
        out.append(
            _streamed(
                prefix + ".scales", scales, pools, _fp_scales(mode, K, pools), rng("s")
            )
        )
    return out


def _fp_scales(mode: str, K: int, pools: _Pools) -> np.ndarray:
    """uint8 scale codes for the microscaling modes (E8M0, or E4M3 for nvfp4)."""
    e4m3 = _e4m3_values()
    element_rms = _rms(e4m3[:127]) if mode == "mxfp8" else _rms(_FP4_MAGNITUDES)
    # The weights' rms, a / sqrt(3) for uniform(+-a), over the elements' rms.
    target = 1 / math.sqrt(3 * K) / element_rms

    def make(r):
        if mode == "nvfp4":
            centre = int(np.nanargmin(np.abs(e4m3[:127] - target)))
        else:  # E8M0: the code is a biased power-of-two exponent
            centre = 127 + round(math.log2(target))
        return (centre + r.integers(-1, 1, POOL, endpoint=True)).astype(np.uint8)

    return pools.get(("fp-scale", mode, K), make)


def _streamed(name, like, pools, pool, rng, xor=False, fix=None) -> Tensor:
    stored, npdtype = STORED_DTYPES[like.dtype]
    n = like.size
    itemsize = np.dtype(npdtype).itemsize
    if pool.dtype != np.dtype(npdtype):
        raise AssertionError(f"{name}: pool dtype {pool.dtype} for stored {stored}.")
    seed = int(rng.integers(0, 2**32))
    return Tensor(
        name,
        stored,
        tuple(like.shape),
        n * itemsize,
        lambda: pools.stream(pool, n, np.random.default_rng(seed), xor=xor, fix=fix),
    )


def _float_tensor(name, value, pools: _Pools) -> Tensor:
    """A floating parameter: mlx-lm's own initial value when small (norms are
    ones, router biases zeros), else uniform in +-1/sqrt(last dim)."""
    if value.size <= SMALL or not mx.issubdtype(value.dtype, mx.floating):
        return tensor_from_array(name, value)
    stored = STORED_DTYPES[value.dtype][0]
    width = value.shape[-1]
    amplitude = 1 / math.sqrt(width)
    pool = pools.get(
        ("float", width, stored),
        lambda r: to_stored(
            r.uniform(-amplitude, amplitude, POOL).astype(np.float32), stored
        ),
    )
    return _streamed(name, value, pools, pool, pools.rng(name))


def _quantized_modules(model) -> Dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size") and "scales" in m
    }


def packed_tensors(model, seed: int = 0) -> List[Tensor]:
    """Every stored tensor of a (lazy) model, values synthesized in packed form.

    Only the shapes and dtypes of the model's parameters are used: nothing of
    the lazy model is evaluated but the small floating parameters.
    """
    pools = _Pools(seed)
    params = dict(tree_flatten(model.parameters()))
    quantized = _quantized_modules(model)
    done, tensors = set(), []
    for name in params:
        prefix, leaf = name.rsplit(".", 1)
        module = quantized.get(prefix)
        if module is not None and leaf in ("weight", "scales", "biases"):
            if prefix in done:
                continue
            if module.get("global_scale") is not None:
                raise NotImplementedError(
                    f"{prefix}: nvfp4 global scales are not synthesized."
                )
            done.add(prefix)
            leaves = {
                k: params[f"{prefix}.{k}"]
                for k in ("weight", "scales", "biases")
                if f"{prefix}.{k}" in params
            }
            tensors.extend(_packed_tensors(prefix, module, leaves, pools))
        else:
            tensors.append(_float_tensor(name, params[name], pools))
    # Keep mlx-lm's parameter order (the order convert writes).
    order = {name: i for i, name in enumerate(params)}
    return sorted(tensors, key=lambda t: order[t.name])
