"""Safetensors files written one tensor at a time: the header is computed from the shapes first, then each tensor
is generated, written and dropped, so a 24 GB file is written with one slice of rows in memory.

The values are seeded per tensor name (the same name gives the same values whatever else the file holds) and
follow one rule, so bf16 activations stay finite through a real-depth model: biases and BatchNorm means zero,
1-D norm scales and BatchNorm variances one, everything else normal(0, 0.02).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.safetensors_rows import DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_CHUNK_BYTES = 256 * 1024**2  # one slice of rows generated at a time: bounds the writer's memory
# Each tensor repeats a seeded random period of this prime length (a prime: no two rows of a matrix alike). Drawing
# every value would take about 4 minutes per 16 GB on this project's 2-core machine; copying a period is disk-bound.
PERIOD = 1_000_003
FP8_MAX = 448.0  # float8 e4m3fn's largest finite value: a cast beyond it gives NaN


Part = tuple[str, tuple[int, ...], int, int]  # (source tensor name, its shape, first row, row after the last)


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """One tensor of a file. Its values are those of its `parts`, stacked by rows: rows of source tensors named and
    shaped as another layout names them (a BFL qkv is the diffusers q, k and v), so both layouts of a fabricated
    model hold the same numbers. Without parts it is its own source; `tensor` gives the values outright."""

    name: str  # the key written to the file
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16
    parts: tuple[Part, ...] = ()
    tensor: torch.Tensor | None = None
    scale: float = 0.0  # fp8 weights: stored = value / scale, as ComfyUI's and BFL's scaled fp8 files keep them

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * torch.empty((), dtype=self.dtype).element_size()

    def sources(self) -> tuple[Part, ...]:
        return self.parts or ((self.name, self.shape, 0, self.shape[0] if self.shape else 1),)


def fill_kind(name: str, shape: tuple[int, ...]) -> str:
    """'zeros', 'ones' or 'normal': the rule every fabricated tensor follows."""
    if name.endswith(("bias", "running_mean", "num_batches_tracked")):
        return "zeros"
    last = name.rsplit(".", 2)
    norm_like = "norm" in name or "layernorm" in name or name.endswith(".scale") or name.endswith("running_var")
    if norm_like and len(shape) == 1 and last[-1] in ("weight", "scale", "running_var"):
        return "ones"
    return "normal"


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _period(source: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The seeded fp32 values a 'normal' tensor repeats."""
    count = 1
    for n in shape:
        count *= n
    generator = torch.Generator().manual_seed(_seed(seed, source))
    return torch.randn(min(PERIOD, count), generator=generator) * 0.02


def fp8_scale(spec: TensorSpec, seed: int) -> float:
    """The scale that maps the largest value of `spec` (of its parts) to fp8 e4m3's largest, as scaled fp8 files
    choose it: nothing saturates."""
    largest = max(_period(source, shape, seed).abs().max().item() for source, shape, _, _ in spec.sources())
    return largest / FP8_MAX


def _rows(source: str, shape: tuple[int, ...], first: int, stop: int, dtype: torch.dtype,
          seed: int, scale: float = 0.0) -> Iterable[torch.Tensor]:
    """Rows first..stop-1 of the fabricated tensor `source` of `shape`, a slice at a time (the same values however
    the rows are cut: each element's value depends on its position in the whole tensor only); with a `scale`, the
    values divided by it (an fp8 file's stored numbers)."""
    kind = fill_kind(source, shape)
    if not shape:
        value = torch.ones(()) if kind == "ones" else torch.zeros(())
        if kind == "normal":
            value = torch.randn((), generator=torch.Generator().manual_seed(_seed(seed, source))) * 0.02
        yield value.to(dtype).reshape(1)
        return
    rest = shape[1:]
    per_row = 1
    for n in rest:
        per_row *= n
    step = max(1, _CHUNK_BYTES // max(1, per_row * torch.empty((), dtype=dtype).element_size()))
    if kind == "normal":
        period = _period(source, shape, seed)
        if scale:  # quantised once per tensor: the rows repeat the period, so this is the whole cost
            period = (period / scale).clamp(-FP8_MAX, FP8_MAX)
        period = period.to(dtype)
    for start in range(first, stop, step):
        count = min(step, stop - start)
        if kind == "zeros":
            yield torch.zeros((count, *rest), dtype=dtype)
        elif kind == "ones":
            yield torch.ones((count, *rest), dtype=dtype)
        else:
            offset, size = (start * per_row) % period.numel(), count * per_row
            rolled = torch.cat([period[offset:], period[:offset]])
            yield rolled.repeat(-(-size // rolled.numel()))[:size].view(count, *rest)


def _slices(spec: TensorSpec, seed: int) -> Iterable[torch.Tensor]:
    if spec.tensor is not None:
        yield spec.tensor.to(spec.dtype)
        return
    for source, shape, first, stop in spec.sources():
        yield from _rows(source, shape, first, stop, spec.dtype, seed, spec.scale)


def values(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The whole tensor in memory (for small ones: the VAE, tests)."""
    return torch.cat([piece.reshape(-1) for piece in _slices(spec, seed)]).view(spec.shape)


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def file_size(specs: list[TensorSpec]) -> int:
    return len(header_bytes(specs)) + sum(spec.nbytes for spec in specs)


def write_file(path: Path, specs: list[TensorSpec], seed: int, metadata: dict[str, str] | None = None) -> int:
    """Writes `specs` to `path` as a safetensors file; returns its size. The file's pages are dropped from the
    page cache once on disk (the machine's memory is for the run that reads it, not for this writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(header_bytes(specs, metadata))
        for spec in specs:
            for piece in _slices(spec, seed):
                handle.write(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
        handle.flush()
        os.fsync(handle.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path.stat().st_size


def shard(specs: list[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    """Tensors grouped in order into shards of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards
