"""Minimal safetensors reader/writer on numpy, with bfloat16 (kept as uint16 bits).

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into
the data that follows the header), then the raw little-endian data.
numpy has no bfloat16, so BF16 tensors are read and written as their raw
uint16 bits and converted with `bf16_to_f32` / `f32_to_bf16`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

# safetensors dtype name -> numpy dtype of the stored bits
_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch and llama.cpp do (no NaNs expected here)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


class SafetensorsFile:
    """A memory-mapped .safetensors file: names, dtypes, shapes and arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=8 + n)

    def names(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The stored bits (BF16 as uint16), without a copy."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        dt = _DTYPES[info["dtype"]]
        return self._data[begin:end].view(dt).reshape(info["shape"])

    def f32(self, name: str) -> np.ndarray:
        """The tensor as float32 (a copy)."""
        raw = self.raw(name)
        if self.dtype(name) == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)


def write_safetensors(path: str | Path,
                      specs: Iterable[tuple[str, str, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes tensors one at a time: `specs` gives (name, dtype, shape) up front
    so the header can be written first; `produce(name)` returns each tensor's
    stored bits (BF16 as uint16) when its turn comes, so at most one tensor is
    in memory."""
    specs = list(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            array = np.ascontiguousarray(produce(name))
            want = _DTYPES[dtype]
            if array.dtype != want or tuple(array.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {array.dtype}{array.shape}, expected {want}{shape}")
            array.tofile(f)
