"""Latents and text embeddings on disk, keyed by the content and every setting that changes them.

A key is the sha256 of a JSON description (file content hash, model, precision, size, crop, caption …), so
a changed input is recomputed and an unchanged one is reused by any later run that points at the same
folder. Entries are safetensors files written atomically: an interrupted write is never read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.files import write_atomic

CACHE_FORMAT = 1  # bump when what a cached tensor means changes


def cache_key(**parts: Any) -> str:
    """A stable key for everything that determines a cached tensor."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so a run hashes each image once."""
    stat = os.stat(path)
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _file_hashes[memo] = digest.hexdigest()
    return _file_hashes[memo]


class DiskCache:
    """One folder of `<key>.safetensors` entries, each a small dict of CPU tensors."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError):
            path.unlink(missing_ok=True)  # unreadable (a disk error, not a torn write): recompute it
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        data = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
        write_atomic(self._path(key), lambda tmp: save_file(data, str(tmp)), durable=False)

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()
