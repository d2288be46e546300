"""A small streaming safetensors reader and writer.

Our own, rather than the `safetensors` package, for three reasons: it reads one tensor at a time with
a positioned read (not a memory map, whose touched pages would stay resident and count against the
converter's memory until the whole file was read), it reads bfloat16 into numpy via ml_dtypes without
torch or jax, and it validates the header against the file size so a truncated download fails with
the name of the tensor it cut, instead of a bus error or garbage.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mllmjax.errors import WeightsError

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{self.path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise WeightsError(f"{self.path}: corrupt safetensors header (length {n})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightsError(f"{self.path}: corrupt safetensors header: {e}") from e
        self._data_start = 8 + n
        header.pop("__metadata__", None)
        self._entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise WeightsError(
                    f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}"
                )
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise WeightsError(
                    f"{self.path}: tensor {name!r} is corrupt (byte size does not match its shape)"
                )
            if self._data_start + end > size:
                raise WeightsError(f"{self.path}: tensor {name!r} is truncated (the file is incomplete)")
            self._entries[name] = (dtype, shape, start, end)
        self._file = open(self.path, "rb")

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def load(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = os.preadv(self._file.fileno(), [view], self._data_start + start) if end > start else 0
        if got != end - start:
            raise WeightsError(f"{self.path}: tensor {name!r} is truncated (short read)")
        return out

    def close(self) -> None:
        self._file.close()


def write_safetensors(path: str | os.PathLike[str], tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write tensors (materialised one list at a time by the caller) in the safetensors format."""
    items = [(name, np.ascontiguousarray(arr)) for name, arr in tensors]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in items:
        if arr.dtype not in _NAMES:
            raise WeightsError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(arr.tobytes())
