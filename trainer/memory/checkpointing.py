"""Gradient checkpointing for the transformer's blocks: every n-th block, and optionally with the checkpoint
inputs waiting in CPU memory during the forward.

diffusers calls `transformer._gradient_checkpointing_func(block, *args)` for each block while grad is enabled;
`enable_block_checkpointing` installs our function there. Blocks are always called through `block(...)`, so
module hooks (TREAD's routing, block swap's loads) fire in the forward and again in the recomputation.

- Plain checkpointing uses torch's non-reentrant checkpoint: only the block's inputs stay alive.
- With `offload`, the block's two streams (the first two arguments: image and text hidden states, the only
  inputs that differ per block) are copied to pinned CPU memory on a side stream and freed on the GPU; in the
  backward the block's inputs come back (the next block's are prefetched while this one recomputes), the
  block is recomputed under the forward's autocast and RNG state, and its gradients flow through
  `torch.autograd.backward`. Shared inputs (modulation, RoPE tables) are kept by reference: copying them per
  block would cost transfers and save nothing.
- Swapped blocks are always checkpointed: their weights live in reused GPU slots, so activations saved by a
  plain forward would point at a slot's later contents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

OFFLOADED_ARGS = 2  # hidden_states and encoder_hidden_states, as diffusers' FLUX blocks take them


class ActivationOffloader:
    """Moves checkpoint inputs to the CPU in forward and back in backward, asynchronously on CUDA."""

    def __init__(self, device: torch.device, pin_memory: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.pin_memory = pin_memory and self.cuda
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._pending: list[_Stored] = []  # forward order; backward takes from the end
        self.bytes_offloaded = 0
        self._blocks = 0  # checkpointed block calls so far: each call's inputs share its number

    def new_block(self) -> int:
        self._blocks += 1
        return self._blocks

    def store(self, tensor: torch.Tensor, block: int) -> _Stored:
        stored = _Stored(self, tensor, block)
        self._pending.append(stored)
        return stored

    def bring_back(self, block: int) -> None:
        """As `block` starts its recomputation: its own inputs first (the backward's first block had none
        prefetched), then every input of the block stored before it, which loads while this one recomputes (a
        double block's two streams both: one alone would leave the other to load when its block asks)."""
        earlier = [stored for stored in self._pending if stored.block < block]
        ahead = [stored for stored in earlier if stored.block == earlier[-1].block] if earlier else []
        for stored in [s for s in self._pending if s.block == block] + ahead:
            stored.start_load()

    def forget(self, stored: _Stored) -> None:
        if stored in self._pending:
            self._pending.remove(stored)

    def reset(self) -> None:
        self._pending.clear()


class _Stored:
    """One tensor in CPU memory, with the event that says its copy is done."""

    def __init__(self, owner: ActivationOffloader, tensor: torch.Tensor, block: int) -> None:
        self.owner, self.block = owner, block
        self.device = tensor.device
        self.requires_grad = tensor.requires_grad
        self.loaded: torch.Tensor | None = None
        self.load_event: Any = None
        owner.bytes_offloaded += tensor.numel() * tensor.element_size()
        if owner.cuda:
            stream = owner.stream
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written by compute
            with torch.cuda.stream(stream):
                self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=owner.pin_memory)
                self.host.copy_(tensor.detach(), non_blocking=True)
                self.store_event = torch.cuda.Event()
                self.store_event.record(stream)
            tensor.record_stream(stream)  # keep the GPU memory until the copy has read it
        else:
            self.host = tensor.detach().to("cpu", copy=True)
            self.store_event = None

    def start_load(self) -> None:
        if self.loaded is not None:
            return
        if not self.owner.cuda:
            self.loaded = self.host.to(self.device, copy=True)
            return
        stream = self.owner.stream
        with torch.cuda.stream(stream):
            stream.wait_event(self.store_event)
            self.loaded = self.host.to(self.device, non_blocking=True)
            self.load_event = torch.cuda.Event()
            self.load_event.record(stream)

    def take(self) -> torch.Tensor:
        self.start_load()
        if self.owner.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.load_event)
            self.loaded.record_stream(current)
        tensor, self.loaded, self.host = self.loaded, None, None
        self.owner.forget(self)
        return tensor.detach().requires_grad_(self.requires_grad)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _OffloadedCheckpoint(torch.autograd.Function):
    """forward(block, offloader, spec, anchor, *flat): `flat` is the block's flattened arguments; `anchor` is an
    empty tensor that requires grad, so the backward reaches the block's LoRA weights even when no input
    needs a gradient (the first block's inputs come from frozen layers)."""

    @staticmethod
    def forward(ctx: Any, block: torch.nn.Module, offloader: ActivationOffloader, spec: Any, anchor: torch.Tensor,
                *flat: Any) -> Any:
        device_type = offloader.device.type
        ctx.block, ctx.offloader, ctx.spec = block, offloader, spec
        ctx.autocast = _autocast_state(device_type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(offloader.device) if offloader.cuda else None
        with torch.no_grad():
            args, kwargs = pytree.tree_unflatten(list(flat), spec)
            outputs = block(*args, **kwargs)
        ctx.stored, ctx.kept = {}, {}
        ctx.number = offloader.new_block()
        streams = _stream_positions(spec, flat)
        for i, value in enumerate(flat):
            if i in streams:
                ctx.stored[i] = offloader.store(value, ctx.number)
            else:
                ctx.kept[i] = value  # shared inputs are alive elsewhere; a reference costs nothing
        ctx.count = len(flat)
        return tuple(pytree.tree_flatten(outputs)[0])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        offloader: ActivationOffloader = ctx.offloader
        inputs: list[Any] = [None] * ctx.count
        offloader.bring_back(ctx.number)
        for i, stored in ctx.stored.items():
            inputs[i] = stored.take()
        for i, value in ctx.kept.items():
            inputs[i] = value.detach().requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor) \
                else value
        enabled, dtype = ctx.autocast
        devices = [offloader.device] if offloader.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, offloader.device)
            with torch.enable_grad(), torch.autocast(offloader.device.type, dtype=dtype, enabled=enabled):
                args, kwargs = pytree.tree_unflatten(inputs, ctx.spec)
                outputs = ctx.block(*args, **kwargs)
        flat_out, _ = pytree.tree_flatten(outputs)
        pairs = [(o, g) for o, g in zip(flat_out, grad_outputs, strict=True)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [value.grad if isinstance(value, torch.Tensor) and value.requires_grad else None for value in inputs]
        ctx.block = ctx.kept = ctx.stored = None
        return (None, None, None, None, *grads)


def _stream_positions(spec: Any, flat: tuple[Any, ...]) -> set[int]:
    """Flat positions of the first OFFLOADED_ARGS positional arguments, when they are plain tensors."""
    positions: set[int] = set()
    index = 0
    for child_number, child in enumerate(spec.child(0).children()):
        width = child.num_leaves
        if child_number < OFFLOADED_ARGS and width == 1 and isinstance(flat[index], torch.Tensor):
            positions.add(index)
        index += width
    return positions


def offloaded_checkpoint(block: torch.nn.Module, offloader: ActivationOffloader, *args: Any) -> Any:
    flat, spec = pytree.tree_flatten((args, {}))
    anchor = torch.empty(0, requires_grad=True)
    flat_out = _OffloadedCheckpoint.apply(block, offloader, spec, anchor, *flat)
    # FLUX blocks return one tensor or a (text, image) pair, both flat already
    return flat_out[0] if len(flat_out) == 1 else tuple(flat_out)


def make_checkpointing_func(blocks: Iterable[torch.nn.Module], interval: int = 1,
                            always: Iterable[int] = (), offloader: ActivationOffloader | None = None
                            ) -> Callable[..., Any]:
    """The function diffusers calls for each block: checkpoint blocks 0, n, 2n, … and every index in `always`
    (swapped blocks); the others run plainly and keep their activations."""
    position = {id(block): index for index, block in enumerate(blocks)}
    forced = set(always)

    def run_block(block: torch.nn.Module, *args: Any) -> Any:
        index = position.get(id(block))
        if index is None or (index % interval and index not in forced):
            return block(*args)
        if offloader is not None:
            return offloaded_checkpoint(block, offloader, *args)
        return checkpoint(block.__call__, *args, use_reentrant=False)

    return run_block


def enable_block_checkpointing(transformer: torch.nn.Module, blocks: list[torch.nn.Module], interval: int = 1,
                               always: Iterable[int] = (), offloader: ActivationOffloader | None = None) -> None:
    """Turn diffusers' checkpointing on with our per-block decision (and offload) instead of its default."""
    transformer.enable_gradient_checkpointing(
        gradient_checkpointing_func=make_checkpointing_func(blocks, interval, always, offloader))
