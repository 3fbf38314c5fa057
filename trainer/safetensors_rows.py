"""Reading a tensor, or a range of its rows, from a safetensors file with plain reads.

safetensors' own reader maps the whole file privately: Linux's overcommit check refuses such a mapping when the
file is larger than RAM + swap (the 33 GB FLUX.2 dev fp8 file on a 24 GB machine: "unable to mmap ... Cannot
allocate memory"), and the pages read stay resident in the process while the file is open. Its `pread` backend
reads a whole tensor for a slice of it. Rows are contiguous bytes in the file, so a slice is one read.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

# safetensors dtype names (the fabricator writes with the same table)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@functools.lru_cache(maxsize=64)
def _header(path: str, _mtime_ns: int, _size: int) -> tuple[int, dict]:
    """(where the tensor bytes start, the JSON header); cached per file version."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return 8 + length, json.loads(handle.read(length))


def header(path: str | Path) -> tuple[int, dict]:
    stat = os.stat(path)
    return _header(str(path), stat.st_mtime_ns, stat.st_size)


def names(path: str | Path) -> list[str]:
    return [name for name in header(path)[1] if name != "__metadata__"]


def shape(path: str | Path, key: str) -> tuple[int, ...]:
    return tuple(header(path)[1][key]["shape"])


def read(path: str | Path, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor `key` as stored, or its rows start..stop-1 (clipped to the tensor, as a slice is), in a buffer
    of its own."""
    start, table = header(path)
    info = table[key]
    dims = [int(n) for n in info["shape"]]
    begin, end = (int(n) for n in info["data_offsets"])
    if rows is not None and dims:
        per_row = (end - begin) // dims[0] if dims[0] else 0
        first, stop = max(0, rows[0]), min(dims[0], rows[1])
        count = max(0, stop - first)
        begin, end, dims = begin + first * per_row, begin + (first + count) * per_row, [count, *dims[1:]]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start + begin)
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):  # a raw read may return less than asked
            got = handle.readinto(view[done:])
            if not got:
                raise OSError(f"'{path}' ends inside tensor '{key}'")
            done += got
    return buffer.view(DTYPES[info["dtype"]]).reshape(dims)
