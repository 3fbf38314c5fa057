"""How block swap moves bytes: host masters, device slots, copies and the waits that order them.

The scheduler (block_swap.py) decides what goes where and when; a `Transfer` carries it out. `CudaTransfer` is
the real one; `CpuTransfer` runs the same decisions with the CPU as the "device", so the packing, rebinding and
ring logic are exercised where no GPU exists; tests wrap it to record every decision.
"""

from __future__ import annotations

from typing import Protocol

import torch

_PAGE = 4096


class Transfer(Protocol):
    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 host buffer for one block's master copy (pinned where that speeds up the copy)."""
        ...

    def release_host(self, buffer: torch.Tensor) -> None:
        """`buffer` is no longer used (unpin it)."""
        ...

    def slot_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer on the device: one ring slot."""
        ...

    def load(self, block: int, slot: int, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy `source` (host master of `block`) into `target` (part of ring slot `slot`) on the copy stream, once
        everything already given to the compute stream is done (it may still use the slot's previous block).
        Must not block the CPU."""
        ...

    def wait(self, slot: int) -> None:
        """Make the compute stream wait for the last load into `slot` (on the device, not on the CPU)."""
        ...

    def copy_event(self, slot: int) -> object | None:
        """What marks the end of the last load into `slot` (a CUDA event), None when it has already finished:
        a staging buffer it read from may be overwritten once it has."""
        ...

    def finish(self) -> None:
        """Block the CPU until every copy is done (only when tearing down)."""
        ...


class CpuTransfer:
    """The CPU as the device: separate slot buffers, synchronous copies, nothing to wait for."""

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def release_host(self, buffer: torch.Tensor) -> None:
        pass

    def slot_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def load(self, block: int, slot: int, source: torch.Tensor, target: torch.Tensor) -> None:
        target.copy_(source)

    def wait(self, slot: int) -> None:
        pass

    def copy_event(self, slot: int) -> None:
        return None  # the copy was synchronous

    def finish(self) -> None:
        pass


def _clear_last_cuda_error() -> None:
    """A failed CUDA runtime call stays the thread's last error until it is read, and torch's next kernel launch
    check would raise it as its own failure: read it away (cudaGetLastError) from the runtime torch loaded, found
    by its versioned name (already loaded, so the same library instance)."""
    import ctypes
    import sys

    major = (torch.version.cuda or "").split(".")[0]
    windows = sys.platform == "win32"
    names = [f"cudart64_{major}.dll", f"cudart64_{major}0.dll"] if windows else [f"libcudart.so.{major}"]
    for name in names:
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue


class CudaTransfer:
    """Copies on a side stream from pinned host memory; events order them against the compute stream."""

    def __init__(self, device: torch.device, pin_memory: bool = True) -> None:
        self.device = device
        self.pin_memory = pin_memory
        self.stream = torch.cuda.Stream(device=device)
        self._copied: dict[int, torch.cuda.Event] = {}
        self._registered: set[int] = set()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        if not self.pin_memory:
            return torch.empty(nbytes, dtype=torch.uint8)
        # torch's pinned allocator rounds every request up to a power of two (a 1.2 GB block would pin 2 GB);
        # registering a page-aligned ordinary buffer pins exactly what the block needs. Page alignment keeps two
        # blocks' buffers off a shared page, which CUDA would refuse to register twice.
        size = -(-nbytes // _PAGE) * _PAGE
        raw = torch.empty(size + _PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % _PAGE
        buffer = raw[start:start + size]  # the view keeps `raw` alive
        code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, 0))
        if code != 0:
            _clear_last_cuda_error()
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # torch's allocator, rounded up
        self._registered.add(buffer.data_ptr())
        return buffer[:nbytes]

    def release_host(self, buffer: torch.Tensor) -> None:
        pointer = buffer.data_ptr()
        if pointer in self._registered:
            self._registered.discard(pointer)
            torch.cuda.cudart().cudaHostUnregister(pointer)

    def slot_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def load(self, block: int, slot: int, source: torch.Tensor, target: torch.Tensor) -> None:
        # The slot's previous block may still be computing: the copy stream waits for all compute issued so far.
        # Slots and masters live until finish(), so the caching allocator never needs record_stream here.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._copied[slot] = done

    def copy_event(self, slot: int) -> torch.cuda.Event | None:
        return self._copied.get(slot)

    def wait(self, slot: int) -> None:
        done = self._copied.pop(slot, None)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def finish(self) -> None:
        self.stream.synchronize()
        self._copied.clear()
