"""Swapped blocks on disk (lowvram.swap_from = "disk"): a block cache file, and the sink that fills it while the
transformer streams in.

The file holds the frozen tensors of the swapped blocks as stored in memory (already quantised), each block packed
the way trainer/memory/block_swap.py packs it (frozen parameters, then buffers, 256-byte aligned), so reading a
block back is one contiguous read into a staging buffer (trainer/memory/staging_ring.py). Layout:

    block 0 bytes | block 1 bytes | ... (each block starts on a 4096-byte boundary)
    footer: JSON {format, key, blocks: [{index, offset, nbytes, crc32, tensors: [[name, offset, nbytes, dtype,
    shape], ...]}]} | 8-byte footer length | MAGIC

It lives beside the latents (data.cache_dir or <output.dir>/cache, in blocks/), named by a content key: the
transformer's files (paths, sizes, modification times), the storage formats and the swapped block count, so a
later run with the same model and settings reuses it and skips reading those blocks from the model at all.
It is written to a temporary name and renamed when complete (an interrupted write is never read); a file whose
footer, key, size or any block's CRC32 does not match is named in the log, moved aside and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.errors import UserError

MAGIC = b"FLSBLK01"
FORMAT = 1
PAGE = 4096
ALIGN = 256  # as trainer/memory/block_swap.py packs a block
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8,
                                torch.uint8, torch.float64, torch.int32, torch.int64, torch.bool)}


class DamagedCache(ValueError):
    """The block cache file cannot be trusted; the message says why."""


@dataclass(frozen=True)
class TensorRecord:
    name: str  # inside the block, peft's `.base_layer` left out
    offset: int  # within the block
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BlockRecord:
    index: int
    offset: int  # within the file
    nbytes: int
    crc32: int
    tensors: tuple[TensorRecord, ...]


def plain_name(name: str) -> str:
    """A tensor's name inside a block as loaded, whether or not peft has wrapped its layer since."""
    return name.replace(".base_layer.", ".")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def frozen_tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A block's frozen tensors in the order block swap packs them: parameters, then buffers (shared ones once)."""
    out = [(name, p) for name, p in block.named_parameters() if not p.requires_grad]
    seen: set[int] = set()
    for module_name, module in block.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                out.append((f"{module_name}.{name}" if module_name else name, buffer))
    return [(plain_name(name), tensor) for name, tensor in out]


def cache_key(sources: list[Path], precision: str, modulation: str | None, swapped: int) -> str:
    """The content key: what the stored blocks were made from and how."""
    files = []
    for path in sorted(sources):
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"format": FORMAT, "files": files, "precision": precision, "modulation": modulation,
                       "swapped": swapped}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- writing


class BlockCacheWriter:
    """Appends packed blocks to `<path>.partial`; `finish()` writes the footer, syncs and renames it to `path`."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.partial, "wb")  # noqa: SIM115 - closed by finish() or abort()
        self.records: list[BlockRecord] = []

    def add(self, index: int, block: nn.Module) -> BlockRecord:
        offset = _round_up(self._file.tell(), PAGE)
        self._file.seek(offset)
        tensors, position, crc = [], 0, 0
        for name, tensor in frozen_tensors(block):
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            pad = _round_up(position, ALIGN) - position
            if pad:
                self._file.write(b"\0" * pad)
                crc = zlib.crc32(b"\0" * pad, crc)
                position += pad
            tensors.append(TensorRecord(name, position, len(data), tensor.dtype, tuple(tensor.shape)))
            self._file.write(data)
            crc = zlib.crc32(data, crc)
            position += len(data)
        record = BlockRecord(index, offset, position, crc, tuple(tensors))
        self.records.append(record)
        return record

    def finish(self) -> None:
        footer = json.dumps({"format": FORMAT, "key": self.key, "blocks": [_record_json(r) for r in self.records]})
        raw = footer.encode("utf-8")
        self._file.write(raw + struct.pack("<Q", len(raw)) + MAGIC)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self._file.close()
        self.partial.unlink(missing_ok=True)


def _record_json(record: BlockRecord) -> dict:
    return {"index": record.index, "offset": record.offset, "nbytes": record.nbytes, "crc32": record.crc32,
            "tensors": [[t.name, t.offset, t.nbytes, str(t.dtype), list(t.shape)] for t in record.tensors]}


# ---------------------------------------------------------------------------------------------- reading


def read_footer(path: Path, key: str) -> list[BlockRecord]:
    """The block records of a complete cache file made for `key`; DamagedCache says what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size < 16:
            raise DamagedCache("it is shorter than its footer")
        handle.seek(size - 16)
        tail = handle.read(16)
        if tail[8:] != MAGIC:
            raise DamagedCache("it does not end with the block cache marker (an interrupted or foreign file)")
        (length,) = struct.unpack("<Q", tail[:8])
        if length > size - 16:
            raise DamagedCache("its footer length is larger than the file")
        handle.seek(size - 16 - length)
        try:
            footer = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedCache("its footer is not readable") from None
    if footer.get("format") != FORMAT or footer.get("key") != key:
        raise DamagedCache("it was made for another model, format or block count")
    records = [_record(item) for item in footer["blocks"]]
    if any(r.offset + r.nbytes > size - 16 - length for r in records):
        raise DamagedCache("its blocks run past the end of the data")
    return records


def _record(item: dict) -> BlockRecord:
    tensors = tuple(TensorRecord(t[0], t[1], t[2], _DTYPES[t[3]], tuple(t[4])) for t in item["tensors"])
    return BlockRecord(item["index"], item["offset"], item["nbytes"], item["crc32"], tensors)


def verify(path: Path, records: list[BlockRecord]) -> None:
    """Every block's CRC32 against the footer's (one read of the file, before it is trusted)."""
    with open(path, "rb") as handle:
        for record in records:
            handle.seek(record.offset)
            crc, left = 0, record.nbytes
            while left:
                chunk = handle.read(min(left, 1 << 24))
                if not chunk:
                    raise DamagedCache(f"block {record.index} is cut short")
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            if crc != record.crc32:
                raise DamagedCache(f"block {record.index} does not match its checksum")


def open_cache(path: Path, key: str, log: Callable[[str], None]) -> list[BlockRecord] | None:
    """The records of a trusted cache file, or None when there is none; a damaged one is named in the log and
    moved aside (`<name>.damaged-<time>`) so it is rebuilt, never trusted."""
    if not path.is_file():
        return None
    try:
        records = read_footer(path, key)
        verify(path, records)
        return records
    except (DamagedCache, OSError, KeyError, TypeError, IndexError) as exc:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log(f"block cache '{path}' is damaged ({exc}); moved it to '{aside.name}' and rebuilding it")
        return None


def check_room(folder: Path, needed_bytes: float, field: str = "lowvram.swap_from") -> None:
    """Refuses, before anything loads, a disk without room for the block cache, with the size it needs."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise UserError(f"{field}: the block cache needs {needed_bytes / 1024**3:.1f} GiB in '{folder}' and the disk "
                        f"has {free / 1024**3:.1f} GiB free; free some space, set data.cache_dir to a larger disk, "
                        'or set lowvram.swap_from = "ram"')


# ---------------------------------------------------------------------------------------------- filling


def _placeholders(block: nn.Module) -> None:
    """Free a stored block's tensors (all frozen: the adapter comes later; a block the cache already held was never
    read and is still on the meta device): zero-element tensors of the same dtypes (on the CPU) stand in for them;
    block swap binds the real bytes from its ring before the block computes."""
    for module in block.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty(0, dtype=param.dtype), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(0, dtype=buffer.dtype)


class BlockSink:
    """Takes the swapped blocks as the transformer loader completes them: written to the cache file (or, when
    the file is already there and sound, not read from the model at all) and freed, so the loading peak holds
    one swapped block at a time. `prefixes`: the swapped blocks' module names in execution order."""

    def __init__(self, prefixes: list[str], path: Path, key: str, log: Callable[[str], None]) -> None:
        self.prefixes = {prefix: index for index, prefix in enumerate(prefixes)}
        self.path = Path(path)
        self.records = open_cache(self.path, key, log)
        self.warm = self.records is not None
        self._writer = None if self.warm else BlockCacheWriter(self.path, key)
        self._done: set[str] = set()

    def wants(self, prefix: str | None) -> bool:
        """Whether the loader must read this module's tensors (a stored block it need not)."""
        return not (self.warm and prefix in self.prefixes)

    def complete(self, prefix: str | None, block: nn.Module) -> None:
        """All of `prefix`'s tensors are loaded (or skipped): store the block if it is a swapped one, free it."""
        if prefix not in self.prefixes or prefix in self._done:
            return
        if self._writer is not None:
            self._writer.add(self.prefixes[prefix], block)
        _placeholders(block)
        self._done.add(prefix)

    def finish(self) -> list[BlockRecord]:
        missing = sorted(set(self.prefixes) - self._done)
        if missing:
            if self._writer is not None:
                self._writer.abort()
            raise RuntimeError(f"block cache: the loader never completed {', '.join(missing[:3])}")
        if self._writer is not None:
            self._writer.finish()
            self.records = sorted(self._writer.records, key=lambda r: r.index)
            self._writer = None
        return list(self.records or [])

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of each tensor kept in the cache file, by its name in the transformer (placeholders here)."""
        by_index = {record.index: record for record in self.records or []}
        return {f"{prefix}.{tensor.name}": tensor.nbytes for prefix, index in self.prefixes.items()
                if index in by_index for tensor in by_index[index].tensors}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
