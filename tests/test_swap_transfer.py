"""The CUDA transfer of block swap, without a GPU: its calls into torch.cuda are scripted and recorded."""

from __future__ import annotations

import pytest
import torch

from trainer.memory.swap_transfer import CudaTransfer


def test_cuda_transfer_orders_copies_with_streams_and_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """CudaTransfer against a scripted torch.cuda: the copy runs on the side stream after it waited for the
    compute stream, non-blocking; the compute stream waits on the copy's event; only finish() blocks the CPU;
    host masters are registered page-aligned (exact size, no power-of-two rounding) and unregistered."""
    calls: list[tuple] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: Stream) -> None:
            calls.append(("wait_stream", self.name, other.name))

        def wait_event(self, event: Event) -> None:
            calls.append(("wait_event", self.name, event.number))

        def synchronize(self) -> None:
            calls.append(("synchronize", self.name))

    class Event:
        made = 0

        def __init__(self) -> None:
            Event.made += 1
            self.number = Event.made

        def record(self, stream: Stream) -> None:
            calls.append(("record", stream.name, self.number))

    current = [Stream("compute")]

    class StreamContext:
        def __init__(self, stream: Stream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current.append(self.stream)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    class Cudart:
        def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
            calls.append(("register", pointer % 4096, size))
            return 0

        def cudaHostUnregister(self, pointer: int) -> int:  # noqa: N802
            calls.append(("unregister", pointer % 4096))
            return 0

    copy = torch.Tensor.copy_

    def traced_copy(self: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        calls.append(("copy", current[-1].name, non_blocking))
        return copy(self, source)

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream("side"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    transfer = CudaTransfer(torch.device("cpu"), pin_memory=True)  # the "device" tensors live on the CPU here
    host = transfer.host_buffer(5000)
    assert calls == [("register", 0, 8192)] and host.numel() == 5000
    host.copy_(torch.arange(5000, dtype=torch.int64).to(torch.uint8))
    slot = transfer.slot_buffer(6000)
    calls.clear()
    monkeypatch.setattr(torch.Tensor, "copy_", traced_copy)
    transfer.load(block=3, slot=1, source=host, target=slot.data[:5000])
    transfer.wait(1)
    transfer.wait(1)  # already waited for: nothing more
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    assert calls == [("wait_stream", "side", "compute"), ("copy", "side", True), ("record", "side", 1),
                     ("wait_event", "compute", 1)]
    assert torch.equal(slot[:5000], host)
    transfer.finish()
    transfer.release_host(host)
    assert calls[-2:] == [("synchronize", "side"), ("unregister", 0)]
