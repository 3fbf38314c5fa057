"""The staging ring for blocks on disk: a few (pinned) host buffers that a reader thread fills from the block cache
file ahead of use, so block swap copies from RAM to the GPU as it does for blocks held in RAM.

Each slot is free, being read, ready (holding block i, not yet copied to the device) or in use (its device copy
issued, maybe not finished). `request(i)` queues a read of block i into a free slot without blocking (the swapper
asks for the next blocks in the current direction); `acquire(i)` waits until block i is in a slot (reading it at
once when no request came in time: a demand read); `release(i, done)` hands the slot back once the device copy
has been issued: on CUDA the reader waits for the copy's event before it overwrites the slot, so the CPU never
blocks the compute stream. A slot holding a block that is ready and not yet acquired is never taken for
another read, so a read-ahead can never evict a block that is about to be used.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.memory.block_store import BlockRecord


@dataclass
class RingStats:
    reads: int = 0
    bytes_read: int = 0
    demand_reads: int = 0  # acquires no read-ahead had covered: the computation waited for the disk


@dataclass
class _Slot:
    buffer: torch.Tensor
    block: int | None = None
    state: str = "free"  # free, reading, ready, in_use
    done: Any = None  # the device copy's event (CUDA), waited for before the slot is read into again
    error: BaseException | None = field(default=None, repr=False)
    sequence: int = 0  # when its read started


class StagingRing:
    """`slots` host buffers the size of the largest block; `make_buffer(nbytes)` allocates one (pinned on CUDA)."""

    def __init__(self, path: Path, records: list[BlockRecord], slots: int,
                 make_buffer: Callable[[int], torch.Tensor]) -> None:
        if slots < 1:
            raise ValueError("the staging ring needs at least one slot")
        self.records = {record.index: record for record in records}
        largest = max((r.nbytes for r in records), default=1)
        self._slots = [_Slot(make_buffer(largest)) for _ in range(slots)]
        self._fd = os.open(str(path), os.O_RDONLY)
        self._lock = threading.Condition()
        self._queue: queue.Queue[int | None] = queue.Queue()
        self.stats = RingStats()
        self._sequence = 0
        self._thread = threading.Thread(target=self._reader, name="block-cache-reader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the swapper's side

    def request(self, index: int) -> bool:
        """Queue a read of block `index` into a free slot; False when it is already there or no slot is free."""
        with self._lock:
            if self._find(index) is not None:
                return False
            slot = self._free_slot()
            if slot is None:
                return False
            self._start(slot, index)
            return True

    def acquire(self, index: int) -> torch.Tensor:
        """The staged bytes of block `index` (its slot is in use until `release`)."""
        with self._lock:
            slot = self._find(index)
            if slot is None:
                self.stats.demand_reads += 1
                slot = self._wait_for_free_slot()
                self._start(slot, index)
            current = self._slots[slot]
            self._lock.wait_for(lambda: current.state != "reading")
            if current.error is not None:
                raise RuntimeError(f"block cache: reading block {index} failed: {current.error}")
            current.state = "in_use"
            return current.buffer[:self.records[index].nbytes]

    def release(self, index: int, done: Any = None) -> None:  # noqa: ANN401 - a torch.cuda.Event or None
        """The device copy of block `index` has been issued (`done`: its event, None when it already finished)."""
        with self._lock:
            slot = self._find(index)
            if slot is not None and self._slots[slot].state == "in_use":
                self._slots[slot].state = "free"
                self._slots[slot].done = done
                self._lock.notify_all()

    def close(self) -> list[torch.Tensor]:
        """Stop the reader; returns the staging buffers, for the caller to release (unpin) them."""
        self._queue.put(None)
        self._thread.join()
        os.close(self._fd)
        return [slot.buffer for slot in self._slots]

    # ------------------------------------------------------------------ inside

    def _find(self, index: int) -> int | None:
        for number, slot in enumerate(self._slots):
            if slot.block == index and slot.error is None:
                if slot.state == "free":
                    slot.state = "ready"  # released but not overwritten since: its bytes are still this block's
                return number
        return None

    def _free_slot(self, demand: bool = False) -> int | None:
        """A free slot; for a demand read, else the oldest read-ahead nobody acquired (a turn of direction can
        leave one behind), never a slot being read or copied from."""
        free = [n for n, slot in enumerate(self._slots) if slot.state == "free"]
        if free or not demand:
            return free[0] if free else None
        ready = [n for n, slot in enumerate(self._slots) if slot.state == "ready"]
        return min(ready, key=lambda n: self._slots[n].sequence) if ready else None

    def _wait_for_free_slot(self) -> int:
        self._lock.wait_for(lambda: self._free_slot(demand=True) is not None)
        return self._free_slot(demand=True)  # type: ignore[return-value]

    def _start(self, slot: int, index: int) -> None:
        current = self._slots[slot]
        self._sequence += 1
        current.block, current.state, current.error, current.sequence = index, "reading", None, self._sequence
        self._queue.put(slot)

    def _reader(self) -> None:
        while (slot := self._queue.get()) is not None:
            current = self._slots[slot]
            if current.done is not None:
                current.done.synchronize()  # the previous block's device copy must finish before overwriting
                current.done = None
            record = self.records[current.block]
            try:
                view = memoryview(current.buffer[:record.nbytes].numpy())
                got = os.preadv(self._fd, [view], record.offset)
                if got != record.nbytes:
                    raise OSError(f"read {got} of {record.nbytes} bytes")
            except (OSError, ValueError) as exc:
                current.error = exc
            with self._lock:
                self.stats.reads += 1
                self.stats.bytes_read += record.nbytes
                current.state = "ready"
                self._lock.notify_all()
