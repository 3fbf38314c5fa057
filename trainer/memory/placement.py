"""Where each model lives while the session runs, by the low-VRAM plan.

- Text encoders, while embeddings are cached: on the GPU whole ("gpu"), on the CPU ("cpu": slow, needs no
  VRAM), or in CPU memory with their layers streamed to the GPU one after another ("offload": the block-swap
  engine, forward only; only the embeddings, final norm and two layers' buffers occupy the GPU).
  An encoder computing on the CPU ("cpu", or any mode on a CPU device) gives the heap's freed pages back after
  each of its layers (below, `_trim_after_each_layer`).
- The transformer, after caching: on the GPU except the frozen weights of its swapped blocks, which the
  block-swap engine keeps in (pinned) CPU memory and streams ahead of use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainer.memory.block_swap import BlockSwapper
from trainer.memory.heap import release_freed_heap


def move_except(module: torch.nn.Module, device: torch.device, skip: Sequence[torch.nn.Module]) -> None:
    """Move every parameter and buffer of `module` to `device`, except those inside the `skip` modules.

    Parameters keep their identity (`.data` is replaced), so optimisers and hooks built on them stay valid."""
    skipped = {id(m) for m in skip}

    def visit(current: torch.nn.Module) -> None:
        if id(current) in skipped:
            return
        for child in current.children():
            visit(child)
        for param in current._parameters.values():
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in current._buffers.items():
            if buffer is not None and buffer.device != device:
                current._buffers[name] = buffer.to(device)

    visit(module)


def decoder_layers(encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers of a text encoder: its heaviest ModuleList (Qwen3/Mistral decoder layers, T5 blocks,
    CLIP layers), not a list nested inside one of them."""
    lists = [m for m in encoder.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []


def _trim_heap(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
    release_freed_heap()  # returns None: a forward hook's return value would replace the layer's output


def _trim_after_each_layer(layers: Sequence[torch.nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
    """glibc's heap, after a streamed load and the layers' packing, is mostly free holes no longer resident; a CPU
    forward's temporaries land in them and, freed, stay resident. Measured on klein base 9B's Qwen3 (int8, 2 prompts
    of 512 tokens, bench/bench_text_encoder_heap.py): the heap's resident pages grew 0.80 GiB while what it
    held in use grew 0.21; the rehearsals' caching phase peaked 0.8 to 1.6 GiB over the loaded encoder, run to run.
    Trimmed after each layer (well under a millisecond) the heap holds what is in use: the phase peaked 0.71 over."""
    return [layer.register_forward_hook(_trim_heap) for layer in layers]


class TextEncoderPlacement:
    """Puts the pipeline's text encoders where the plan says for caching; `release()` undoes the streaming."""

    def __init__(self, pipe: Any, device: torch.device, mode: str, pin_memory: bool = True) -> None:
        self.swappers: list[BlockSwapper] = []
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
        for encoder in encoders:
            encoder.requires_grad_(False)  # never trained; frozen weights are what the swap engine streams
            layers = decoder_layers(encoder)
            if mode == "cpu" or device.type == "cpu":
                self.hooks += _trim_after_each_layer(layers)
            if mode == "cpu":
                continue
            if mode == "offload" and len(layers) >= 2:  # on a CPU device it runs the same code with plain copies
                swapper = BlockSwapper(layers, len(layers), device, prefetch=1, pin_memory=pin_memory)
                swapper.install()
                move_except(encoder, device, layers)
                self.swappers.append(swapper)
            else:
                encoder.to(device)

    def release(self) -> None:
        for swapper in self.swappers:
            swapper.remove()
        for hook in self.hooks:
            hook.remove()
        self.swappers, self.hooks = [], []


def place_transformer(transformer: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device,
                      blocks_to_swap: int, prefetch: int, pin_memory: bool,
                      disk: tuple[Any, list] | None = None) -> BlockSwapper | None:
    """The transformer on `device`, its first `blocks_to_swap` blocks streamed from CPU memory, or from the block
    cache file through a staging ring when `disk` gives (file, block records).

    Call after the LoRA is added (the swapper keeps trainable weights on the GPU and only frozen ones on the
    host) and after checkpointing is enabled (swapped blocks must be checkpointed)."""
    swapper = None
    if blocks_to_swap:
        swapper = BlockSwapper(list(blocks), blocks_to_swap, device, prefetch=prefetch, pin_memory=pin_memory,
                               disk=disk)
        swapper.install()
    move_except(transformer, device, list(blocks[:blocks_to_swap]))
    return swapper
