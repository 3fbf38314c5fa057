"""Block swap: stream the frozen weights of the first blocks from host memory through a small ring on the GPU.

Design (TECHNIQUES.md, "Block swap"):
- Each swapped block's frozen tensors (frozen parameters and buffers, any dtype) are packed once into one flat
  host byte buffer, pinned on CUDA, so loading a block is ONE host-to-device copy. Trainable tensors (LoRA) of
  swapped blocks move to the device at install and stay there.
- The device holds a ring of `prefetch + 1` flat byte buffers (slots) sized to the largest block. Block i (its
  position among the swapped blocks) always lands in slot i % slots: in forward order and in reverse the window
  "current block + the next `prefetch`" is consecutive, so its blocks never collide. Loading rebinds the block's
  frozen tensors to views of its slot; the block a load evicts points at an empty placeholder until it is loaded
  again. Nothing is ever copied back: the weights are frozen and the host copy is the master.
- A forward pre-hook on every block makes sure the block about to run is loaded (the compute stream waits on the
  copy's event, the CPU does not block) and issues the copies of the next `prefetch` swapped blocks in the current
  direction on a side stream. Backward is detected by the autograd engine's graph task: gradient checkpointing
  recomputes each block's forward inside backward, in reverse order, and the pre-hook fires again there. The last
  blocks of the forward are still in their slots at the turn, so the backward starts without loading them.

Why swapped blocks need gradient checkpointing, and why the ring is then safe:
- Without it, autograd keeps the weights a block used (views of its slot) until backward, when the slot holds
  another block. With checkpointing a block saves none of its weights in forward (non-reentrant: saved tensors
  go to checkpoint's hooks; reentrant and offloading variants: the forward runs without grad). In backward its
  recomputation saves views of its slot, and only its own gradient nodes read them.
- The autograd engine runs the ready node with the highest sequence number first, and all of block k+1's nodes
  were created after block k's: every gradient node of block k+1 has run (on the GPU: been issued) before the
  first node of block k triggers block k's recomputation, whose pre-hook is the first point where block k+1's
  slot can be given to another block. On the GPU the copy stream then also waits for everything issued so far.
- Copies write through `slot.data`, so they never bump the version counter the slot's views share: no autograd
  check trips, and none would be due (above). Saved tensors under hooks are not version-checked anyway.
- The pre-hook refuses a forward that records gradients through a swapped block while no saved-tensor hooks are
  active. Hooks that keep a copy (save_on_cpu around a plain forward) are correct but copy the weights back
  every step: checkpoint swapped blocks.

Usage: freeze the base and add the adapter, enable checkpointing, `install()`, then move everything but the
swapped blocks to the device (trainer.memory.placement.move_except). `remove()` before moving or freeing the
model. On the CPU (tests) CpuTransfer runs the same schedule with the CPU as the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainer.memory.block_store import BlockRecord, plain_name
from trainer.memory.heap import release_freed_heap
from trainer.memory.staging_ring import StagingRing
from trainer.memory.swap_transfer import CpuTransfer, CudaTransfer, Transfer

__all__ = ["BlockSwapper", "CpuTransfer", "CudaTransfer", "SwapStats", "Transfer", "flux_blocks"]

# Offsets inside a packed block: 256 bytes suits every dtype's view and vectorised device loads.
ALIGN = 256


@dataclass
class SwapStats:
    """Counters for the log and the bench; `demand_loads` are loads no prefetch covered (the compute stalls)."""

    copies: int = 0
    bytes_copied: int = 0
    waits: int = 0
    demand_loads: int = 0

    def reset(self) -> None:
        self.copies = self.bytes_copied = self.waits = self.demand_loads = 0


@dataclass(frozen=True)
class _Span:
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class _Packed:
    """One swapped block: where each frozen tensor lives in the flat buffer, and its host master."""

    block: nn.Module
    params: list[tuple[nn.Parameter, _Span]] = field(default_factory=list)
    buffers: list[tuple[list[tuple[nn.Module, str]], _Span]] = field(default_factory=list)  # every (owner, name)
    trainable: list[nn.Parameter] = field(default_factory=list)
    nbytes: int = 0
    host: torch.Tensor | None = None


def flux_blocks(transformer: nn.Module) -> list[nn.Module]:
    """A FLUX transformer's blocks in execution order: double-stream blocks, then single-stream blocks."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _check_plain(tensor: torch.Tensor, what: str) -> None:
    plain = type(tensor) in (torch.Tensor, nn.Parameter) and type(tensor.data) is torch.Tensor
    if not plain:
        raise TypeError(f"block swap packs plain tensors only; {what} is a {type(tensor).__name__} (quantised layers "
                        "must keep their data in plain tensors or buffers)")
    if tensor.is_meta:
        raise ValueError(f"block swap: {what} has no data (meta device); load the weights before install()")


def _pack_layout(block: nn.Module, index: int) -> _Packed:
    packed = _Packed(block=block)
    offset = 0

    def place(tensor: torch.Tensor) -> _Span:
        nonlocal offset
        span = _Span(offset, tensor.numel() * tensor.element_size(), tensor.dtype, tensor.shape)
        offset = _round_up(offset + span.nbytes, ALIGN)
        return span

    for name, param in block.named_parameters():  # deduplicated: a tied parameter is packed once
        _check_plain(param, f"parameter {name} of swapped block {index}")
        if param.requires_grad:
            packed.trainable.append(param)
        else:
            packed.params.append((param, place(param)))
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for module in block.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                _check_plain(buffer, f"buffer {name} of swapped block {index}")
                owners.setdefault(id(buffer), []).append((module, name))
                tensors[id(buffer)] = buffer
    packed.buffers = [(owners[key], place(tensors[key])) for key in owners]
    packed.nbytes = offset
    if not offset and packed.trainable:
        # Trainable tensors stay on the device: a block with nothing frozen is a base model left unfrozen (a
        # size test would misfire: a large-rank LoRA can outweigh an nf4 base).
        raise ValueError(f"block swap: nothing in swapped block {index} is frozen; freeze the base model "
                         "(requires_grad_(False)) before adding the adapter and installing block swap")
    return packed


def _pack_from_record(block: nn.Module, index: int, record: BlockRecord) -> _Packed:
    """The packed layout of a block whose frozen bytes wait in the block cache file: spans from its record (the
    block's own frozen tensors are zero-element placeholders by now)."""
    by_name = {t.name: t for t in record.tensors}
    packed = _Packed(block=block, nbytes=record.nbytes)

    def span(name: str) -> _Span:
        found = by_name.pop(plain_name(name), None)
        if found is None:
            raise ValueError(f"block cache: swapped block {index} has no stored '{name}'; the cache does not match "
                             "the model (delete it to rebuild)")
        return _Span(found.offset, found.nbytes, found.dtype, torch.Size(found.shape))

    for name, param in block.named_parameters():
        if param.requires_grad:
            packed.trainable.append(param)
        else:
            packed.params.append((param, span(name)))
    for module_name, module in block.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                packed.buffers.append(([(module, name)], span(f"{module_name}.{name}" if module_name else name)))
    if by_name:
        raise ValueError(f"block cache: swapped block {index} stores tensors the model lacks ({', '.join(by_name)})")
    return packed


def _view(flat: torch.Tensor, span: _Span) -> torch.Tensor:
    return flat[span.offset:span.offset + span.nbytes].view(span.dtype).view(span.shape)


def _inputs_need_grad(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in (*args, *kwargs.values()))


class BlockSwapper:
    """Streams the first `swapped` of `blocks` (execution order) to `device`; the rest stay where the caller put
    them. `prefetch`: swapped blocks copied ahead of the one computing (the ring has prefetch + 1 slots).
    `disk`: (cache file, block records) when the swapped blocks wait on disk (trainer/memory/block_store.py): a
    staging ring of prefetch + 1 host buffers is read ahead of use instead of keeping every block in RAM."""

    def __init__(self, blocks: Sequence[nn.Module], swapped: int, device: torch.device | str, prefetch: int = 1,
                 pin_memory: bool = True, transfer: Transfer | None = None,
                 disk: tuple[Path, list[BlockRecord]] | None = None) -> None:
        if not 0 <= swapped <= len(blocks):
            raise ValueError(f"blocks_to_swap {swapped} outside 0..{len(blocks)}")
        if prefetch < 0:
            raise ValueError(f"swap_prefetch must be 0 or more, got {prefetch}")
        self.blocks = list(blocks)
        self.swapped = swapped
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.transfer = transfer or _default_transfer(self.device, pin_memory)
        self.stats = SwapStats()
        self.slot_count = min(prefetch + 1, swapped)
        self._packed: list[_Packed] = []
        self._slots: list[torch.Tensor] = []
        self._occupant: list[int | None] = []
        self._unwaited: set[int] = set()  # slots whose last copy the compute stream has not waited for
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.disk = disk
        self.ring: StagingRing | None = None

    # ------------------------------------------------------------------ public

    @property
    def installed(self) -> bool:
        return bool(self._hooks)

    def swapped_block_set(self) -> set[nn.Module]:
        """The swapped blocks: the checkpointing setup must checkpoint every one of them."""
        return set(self.blocks[:self.swapped])

    def is_swapped(self, block: nn.Module) -> bool:
        return any(block is b for b in self.blocks[:self.swapped])

    @property
    def host_bytes(self) -> int:
        return sum(p.nbytes for p in self._packed)

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() for s in self._slots)

    def install(self) -> BlockSwapper:
        """Pack the swapped blocks' frozen tensors into host masters, allocate the ring, hook every block.

        Add the adapter before (its modules replace the base layers); move the rest of the model after, without
        the swapped blocks (their frozen weights are empty placeholders on the device from now on)."""
        if self.installed:
            raise RuntimeError("block swap is already installed")
        if not self.swapped:
            return self
        if self.disk is not None:
            self._install_from_disk()
        else:
            self._install_in_ram()
        release_freed_heap()
        largest = max(max(p.nbytes for p in self._packed), 1)
        self._slots = [self.transfer.slot_buffer(largest) for _ in range(self.slot_count)]
        self._occupant = [None] * self.slot_count
        for index, block in enumerate(self.blocks):
            # prepend: the weights are in place before any other pre-hook looks at the block
            self._hooks.append(block.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True,
                                                               prepend=True))
        return self

    def _install_from_disk(self) -> None:
        path, records = self.disk
        by_index = {record.index: record for record in records}
        self._packed = [_pack_from_record(block, i, by_index[i]) for i, block in enumerate(self.blocks[:self.swapped])]
        for packed in self._packed:
            for param, span in packed.params:
                param.data = self._placeholder(span.dtype)
            for owners, span in packed.buffers:
                for module, name in owners:
                    module._buffers[name] = self._placeholder(span.dtype)
            for param in packed.trainable:
                param.data = param.data.to(self.device)
        self.ring = StagingRing(path, [by_index[i] for i in range(self.swapped)], self.slot_count,
                                self.transfer.host_buffer)

    def _install_in_ram(self) -> None:
        self._packed = [_pack_layout(block, i) for i, block in enumerate(self.blocks[:self.swapped])]
        self._check_not_shared()
        for packed in self._packed:
            release_freed_heap()  # the last block's tensors, freed as they were packed (trainer/memory/heap.py)
            host = self.transfer.host_buffer(max(packed.nbytes, 1))
            for param, span in packed.params:
                host[span.offset:span.offset + span.nbytes].copy_(_as_bytes(param))
                param.data = self._placeholder(span.dtype)  # the original storage is released here
            for owners, span in packed.buffers:
                module, name = owners[0]
                host[span.offset:span.offset + span.nbytes].copy_(_as_bytes(module._buffers[name]))
                for module, name in owners:
                    module._buffers[name] = self._placeholder(span.dtype)
            for param in packed.trainable:
                param.data = param.data.to(self.device)
                if param.grad is not None:
                    param.grad = param.grad.to(self.device)
            packed.host = host

    def remove(self) -> None:
        """Give the swapped blocks ordinary host tensors again (frozen and trainable), free the ring and the host
        masters, unhook. The model can then be moved or freed like any other."""
        if not self.installed:
            return
        self.transfer.finish()  # no copy may still write into a slot or read a master
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.ring is not None:
            self._remove_disk()
            return
        for packed in self._packed:
            host = packed.host
            for param, span in packed.params:
                param.data = _view(host, span).clone()  # clones: the (pinned) master is freed below
            for owners, span in packed.buffers:
                restored = _view(host, span).clone()
                for module, name in owners:
                    module._buffers[name] = restored
            for param in packed.trainable:
                param.data = param.data.to("cpu")
                if param.grad is not None:
                    param.grad = param.grad.to("cpu")
            packed.host = None
            self.transfer.release_host(host)
        self._packed, self._slots, self._occupant, self._unwaited = [], [], [], set()
        self._placeholders = {}

    def _remove_disk(self) -> None:
        """Blocks on disk stay there: their frozen tensors become zero-element CPU placeholders (the model is being
        freed; reading them back would need the RAM the disk saved)."""
        for buffer in self.ring.close():
            self.transfer.release_host(buffer)
        for packed in self._packed:
            for param, span in packed.params:
                param.data = torch.empty(0, dtype=span.dtype)
            for owners, span in packed.buffers:
                for module, name in owners:
                    module._buffers[name] = torch.empty(0, dtype=span.dtype)
            for param in packed.trainable:
                param.data = param.data.to("cpu")
        self.ring = None
        self._packed, self._slots, self._occupant, self._unwaited = [], [], [], set()
        self._placeholders = {}

    def __enter__(self) -> BlockSwapper:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ scheduling

    def _pre_hook(self, index: int):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._before_block(index, args, kwargs)

        return hook

    def _before_block(self, index: int, args: tuple, kwargs: dict) -> None:
        # A recomputation inside backward runs within an autograd graph task; a plain forward never does.
        backward = torch._C._current_graph_task_id() != -1
        if index < self.swapped:
            if not backward:
                self._refuse_unsafe_forward(index, args, kwargs)
            slot = index % self.slot_count
            if self._occupant[slot] != index:
                self.stats.demand_loads += 1
                self._load(index)
            if slot in self._unwaited:
                self.transfer.wait(slot)
                self._unwaited.discard(slot)
                self.stats.waits += 1
        if backward:
            ahead = range(min(index, self.swapped) - 1, -1, -1)
        else:
            ahead = range(index + 1, self.swapped)
        upcoming_blocks = [b for b in ahead if self._occupant[b % self.slot_count] != b]
        for upcoming in list(ahead)[:self.prefetch]:
            if self._occupant[upcoming % self.slot_count] != upcoming:
                self._load(upcoming)
        if self.ring is not None:  # the disk reads run ahead of the device copies
            for upcoming in upcoming_blocks[self.prefetch:self.prefetch + self.slot_count]:
                self.ring.request(upcoming)

    def _refuse_unsafe_forward(self, index: int, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled() or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return
        if self._packed[index].trainable or _inputs_need_grad(args, kwargs):
            raise RuntimeError(
                f"block swap: swapped block {index} runs a forward that records gradients without gradient "
                "checkpointing; its saved weights would be overwritten in the ring before backward. Enable "
                "gradient checkpointing on every swapped block (transformer.enable_gradient_checkpointing()) or run "
                "this forward under torch.no_grad()."
            )

    def _load(self, index: int) -> None:
        slot = index % self.slot_count
        evicted = self._occupant[slot]
        if evicted is not None:
            self._bind(self._packed[evicted], None)
        packed = self._packed[index]
        source = self.ring.acquire(index) if self.ring is not None else packed.host[:packed.nbytes]
        # .data: the copy must not bump the version counter the block's views share (see the module docstring)
        self.transfer.load(index, slot, source, self._slots[slot].data[:packed.nbytes])
        if self.ring is not None:
            self.ring.release(index, self.transfer.copy_event(slot))
        self._bind(packed, self._slots[slot])
        self._occupant[slot] = index
        self._unwaited.add(slot)
        self.stats.copies += 1
        self.stats.bytes_copied += packed.nbytes

    def _bind(self, packed: _Packed, slot: torch.Tensor | None) -> None:
        """Point the block's frozen tensors at views of `slot`, or at empty placeholders (None)."""
        for param, span in packed.params:
            param.data = self._placeholder(span.dtype) if slot is None else _view(slot, span)
        for owners, span in packed.buffers:
            tensor = self._placeholder(span.dtype) if slot is None else _view(slot, span)
            for module, name in owners:
                module._buffers[name] = tensor

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        # Zero elements on the device: no memory, the right dtype and device for model.dtype / model.device, and
        # any computation with an unloaded block fails loudly on the shape instead of reading stale weights.
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def _check_not_shared(self) -> None:
        """A frozen tensor shared with a block that stays resident cannot live in both places."""
        packed_ids = {id(p) for packed in self._packed for p, _ in packed.params}
        packed_ids |= {id(o[0][0]._buffers[o[0][1]]) for packed in self._packed for o, _ in packed.buffers}
        for index, block in enumerate(self.blocks[self.swapped:], start=self.swapped):
            for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
                if id(tensor) in packed_ids:
                    raise ValueError(f"block swap: {name} of resident block {index} is shared with a swapped block")


def _default_transfer(device: torch.device, pin_memory: bool) -> Transfer:
    if device.type == "cuda":
        return CudaTransfer(device, pin_memory=pin_memory)
    if device.type == "cpu":
        return CpuTransfer()
    raise ValueError(f"block swap supports CUDA devices (and the CPU, for tests); got {device}")
