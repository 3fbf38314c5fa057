"""Measure the memory of one training step on the CPU, to check trainer/estimator/core.py against reality.

What is counted (`measure_training_step`):
- `resident`: bytes of the distinct storages of the transformer's parameters and buffers (frozen base, LoRA),
  of any optimiser state and gradients that exist before the measured step (a step after the first: the state
  the first step creates is there, as in every later step of a run; an offloaded optimiser's masters and gradient
  buffers, a fused backward's per-parameter optimisers included), and of a block swap's host masters and ring
  slots, counted once each;
- `step_peak`: the most bytes of storages allocated DURING the step (forward, backward, clipping, optimiser
  step, zero_grad) that were alive at the same time: activations saved for backward, temporaries, gradients.
  A `TorchDispatchMode` sees every tensor an ATen op returns; each new storage is recorded by its data pointer
  with its size, and a weakref finalizer on the storage object subtracts it when it is freed. Views share their
  storage, so nothing is counted twice;
- `peak = resident + step_peak`. Not counted: allocator caching and fragmentation, the CUDA context, tensors
  created outside ATen ops (none in a training step), and memory held by libraries outside torch tensors.

On a CUDA device `measure_training_step` also reports `cuda_max_allocated` (torch.cuda.max_memory_allocated
over the step), which includes everything resident on the GPU.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of live storages created by ATen ops while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage data_ptr -> nbytes
        self.current = 0
        self.peak = 0
        self._known: set[int] = set()

    def ignore(self, tensors: Any) -> None:
        """Storages that existed before tracking (parameters...): never counted as new."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._known.add(t.untyped_storage().data_ptr())

    def _freed(self, ptr: int) -> None:
        size = self.live.pop(ptr, 0)
        self.current -= size

    def _record(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._known or ptr in self.live:
            return
        size = storage.nbytes()
        self.live[ptr] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, ptr)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(t)
        return out


@dataclass
class StepMemory:
    resident_bytes: int
    step_peak_bytes: int
    cuda_max_allocated: int | None = None

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.step_peak_bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def _storage_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:  # noqa: ANN401 - any optimiser or wrapper
    """State tensors of a torch optimiser or of the plan's wrappers (trainer/memory/optimizer_memory.py): an
    offloaded optimiser's fp32 masters and gradient buffers and its inner optimiser, a fused backward's
    per-parameter optimisers."""
    tensors: list[torch.Tensor] = []
    for state in getattr(optimizer, "state", {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [*getattr(optimizer, "masters", []), *getattr(optimizer, "_grads", [])]
    for inner in [getattr(optimizer, "inner", None), *getattr(optimizer, "optimizers", [])]:
        if inner is not None:
            tensors += _optimizer_tensors(inner)
    return tensors


def _swap_tensors(swapper: Any) -> list[torch.Tensor]:  # noqa: ANN401 - a BlockSwapper or None
    """A block swap's host masters (one packed buffer per swapped block) and its ring slots."""
    if swapper is None:
        return []
    hosts = [packed.host for packed in getattr(swapper, "_packed", []) if packed.host is not None]
    return [*hosts, *getattr(swapper, "_slots", [])]


def _resident(session: Any) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = [*session.transformer.parameters(), *session.transformer.buffers()]
    tensors += [p.grad for p in session.transformer.parameters() if p.grad is not None]
    tensors += _optimizer_tensors(session.optimizer)
    tensors += _swap_tensors(getattr(session, "swapper", None))
    return tensors


def measure_training_step(session: Any, warmup_steps: int = 1) -> StepMemory:
    """One optimiser step of a set-up `trainer.session.Session` (call `.setup()` first), measured after
    `warmup_steps` unmeasured ones (the job's max_steps must allow both)."""
    # A run's first step creates the optimiser's state after its backward, so its forward and backward peak without
    # it; every later step holds it from the start, as the estimate does (the demo's rank-8 LoRA: 1 MB of 11).
    session.train(warmup_steps)
    gc.collect()
    resident = _resident(session)
    tracker = LiveTensorTracker()
    tracker.ignore(resident)
    cuda = session.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tracker:
        session.train(1)
    gc.collect()
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    return StepMemory(_storage_bytes(resident), tracker.peak, cuda_peak)
