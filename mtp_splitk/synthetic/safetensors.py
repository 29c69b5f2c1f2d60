# Copyright © 2026 mtp_splitk contributors

"""Stored tensors and a streaming safetensors writer.

A :class:`Tensor` is a name, a safetensors dtype, a shape and a function
yielding its bytes in chunks, so a file of any size is written with one
chunk in memory; :func:`write_safetensors` writes the format ``mx.load``
reads.
"""

import json
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

import mlx.core as mx
import numpy as np

# safetensors dtype names, and the numpy dtype that carries the same bytes
# (numpy has no bfloat16: its bits travel as uint16).
STORED_DTYPES = {
    mx.bool_: ("BOOL", np.bool_),
    mx.uint8: ("U8", np.uint8),
    mx.uint16: ("U16", np.uint16),
    mx.uint32: ("U32", np.uint32),
    mx.int8: ("I8", np.int8),
    mx.int16: ("I16", np.int16),
    mx.int32: ("I32", np.int32),
    mx.int64: ("I64", np.int64),
    mx.float16: ("F16", np.float16),
    mx.bfloat16: ("BF16", np.uint16),
    mx.float32: ("F32", np.float32),
}
_NUMPY_STORED = {np.dtype(n): s for s, n in STORED_DTYPES.values() if s != "BF16"}


@dataclass
class Tensor:
    """One stored tensor: its name, safetensors dtype, shape and its bytes in chunks."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterator[np.ndarray]]


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, mx.array):
        return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
    return np.ascontiguousarray(a)


def tensor_from_array(name: str, a) -> Tensor:
    """A Tensor holding an mx.array or np.ndarray as it is."""
    if isinstance(a, mx.array):
        if a.dtype not in STORED_DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors.")
        dtype = STORED_DTYPES[a.dtype][0]
    else:
        a = np.asarray(a)
        if a.dtype not in _NUMPY_STORED:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors.")
        dtype = _NUMPY_STORED[a.dtype]
    itemsize = 2 if dtype == "BF16" else np.dtype(numpy_dtype(dtype)).itemsize
    return Tensor(
        name, dtype, tuple(a.shape), a.size * itemsize, lambda: iter([_as_numpy(a)])
    )


def numpy_dtype(stored: str):
    """The numpy dtype that carries a safetensors dtype's bytes (uint16 for BF16)."""
    return next(n for s, n in STORED_DTYPES.values() if s == stored)


def write_safetensors(path, tensors: List[Tensor], progress=None) -> None:
    """Stream ``tensors`` into one safetensors file (the format mx.load reads).

    The header is written first from the shapes alone, then each tensor's
    chunks, so memory stays at one chunk whatever the file size.
    """
    header = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                f.write(np.ascontiguousarray(chunk).data)
                written += chunk.nbytes
                if progress is not None:
                    progress(chunk.nbytes)
            if written != t.nbytes:
                raise AssertionError(
                    f"{t.name}: wrote {written} bytes, expected {t.nbytes}."
                )


def to_stored(x: np.ndarray, stored: str) -> np.ndarray:
    """float32 values in the bytes of a floating safetensors dtype."""
    if stored == "BF16":
        bits = x.astype(np.float32).view(np.uint32)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
        return (bits >> 16).astype(np.uint16)
    return x.astype(numpy_dtype(stored))
