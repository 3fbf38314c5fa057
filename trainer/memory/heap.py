"""Hand freed heap memory back to the operating system (glibc's malloc_trim), where a model's load or release
leaves it resident.

A weight quantised while it streams in is read a slice at a time (16 MiB of fp32): once a slice that size has been
freed, glibc serves allocations up to it from the heap instead of fresh mappings, so the slices and the quantised
tensors kept (a 4096 x 4096 int8 weight is 16 MiB) end up interleaved there. The slices freed leave holes that
stay resident: measured at real size, Qwen3-8B streamed in as int8 (8.2 GiB of weights) left 2.5 GiB of such holes,
and freeing the text encoder left 3.5 GiB resident through the latents and the transformer's load. malloc_trim(0)
returns every whole free page of the heap; it takes well under a millisecond for a heap of a few GiB with few
holes. Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _trim() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_heap() -> bool:
    """Return the heap's free pages to the OS; True when it could ask (glibc)."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True


class HeapTrimmer:
    """Calls `release_freed_heap` once every `every_bytes` streamed in: a trim re-faults the slice buffer's pages
    on its next use (about 0.1 s per trim at real size), so once per block or decoder layer, not per tensor."""

    def __init__(self, every_bytes: int = 256 * 1024**2) -> None:
        self.every_bytes = every_bytes
        self.pending = 0

    def add(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every_bytes:
            self.flush()

    def flush(self) -> None:
        self.pending = 0
        release_freed_heap()
