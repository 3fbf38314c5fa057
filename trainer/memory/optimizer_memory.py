"""Optimiser memory: the state and step on the CPU, and the step fused into the backward pass.

- `OffloadedOptimizer`: fp32 master copies of the trainable parameters and the whole optimiser state live in
  (pinned) CPU memory; a step copies the gradients down, steps on the CPU and copies the weights back. The GPU
  keeps only the weights and their gradients. Worth it for large ranks; a rank-16 LoRA saves little.
- `FusedBackward`: one optimiser per parameter, stepped in the parameter's post-accumulate-grad hook as soon as
  its gradient is complete on the last micro-batch, after which the gradient is freed; so at most a few
  gradients are alive at once. Clipping is then per parameter (`max_grad_norm` bounds each parameter's gradient
  norm, not the global one) — the documented price; with clipping off the maths is the unfused one exactly.
  Optimisers that couple parameters (Prodigy's shared step size) and fp16's loss scaling are refused by the spec.

Both offer what the session uses of an optimiser (`step`, `zero_grad`, `state_dict`, `load_state_dict`,
`param_groups`), so state save and exact resume work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainer.memory.heap import release_freed_heap

BuildOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
BuildScheduler = Callable[[torch.optim.Optimizer], Any]


class OffloadedOptimizer:
    """An optimiser over CPU copies of `params`; its step runs on the CPU and writes the weights back."""

    def __init__(self, params: Sequence[torch.nn.Parameter], build: BuildOptimizer, pin_memory: bool = True) -> None:
        self.params = list(params)
        cuda = any(p.device.type == "cuda" for p in self.params)
        pin = pin_memory and cuda
        self.masters = [torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32, pin_memory=pin))
                        for p in self.params]
        self._grads = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for p in self.params]
        with torch.no_grad():
            for master, param in zip(self.masters, self.params, strict=True):
                master.copy_(param.detach())
        self.inner = build(self.masters)
        self._cuda = cuda
        self._staged = [False] * len(self.params)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    def stage_gradients(self) -> None:
        """Start copying the present gradients into the pinned host buffers and drop them from the GPU (the copy is
        queued on the compute stream first, so the freed memory is reused only after it); `step()` uses them."""
        for index, param in enumerate(self.params):
            if param.grad is not None:
                self._grads[index].copy_(param.grad.detach(), non_blocking=True)
                self._staged[index] = True
                param.grad = None

    def step(self) -> None:
        self.stage_gradients()
        if self._cuda:
            torch.cuda.current_stream().synchronize()  # the CPU step reads the gradients
        self.step_staged()

    def step_staged(self) -> None:
        """The CPU step on gradients already staged and arrived (the caller synchronised), weights copied back."""
        live = [index for index, staged in enumerate(self._staged) if staged]
        for index in live:
            self.masters[index].grad = self._grads[index]
        self.inner.step()
        with torch.no_grad():
            for index in live:  # from pinned memory: overlaps the next forward
                self.params[index].copy_(self.masters[index], non_blocking=True)
                self.masters[index].grad = None
                self._staged[index] = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
        with torch.no_grad():  # the resumed weights were copied into the parameters; the masters follow them
            for master, param in zip(self.masters, self.params, strict=True):
                master.copy_(param.detach())


class _Schedulers:
    """One learning-rate schedule per fused optimiser, stepped together."""

    def __init__(self, schedulers: list[Any]) -> None:
        self.schedulers = schedulers

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.schedulers[0].get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)


class FusedBackward:
    """Steps each parameter inside the backward of the last micro-batch. With `offload`, the hook only stages the
    gradient to pinned host memory (freeing it on the GPU) and `step()` runs every CPU step after one
    synchronisation: a synchronisation per parameter would stall the GPU hundreds of times per backward."""

    def __init__(self, params: Sequence[torch.nn.Parameter], build: BuildOptimizer, build_scheduler: BuildScheduler,
                 max_grad_norm: float = 0.0, offload: bool = False, pin_memory: bool = True) -> None:
        self.params = list(params)
        self.max_grad_norm = max_grad_norm
        self.offload = offload
        self.optimizers: list[Any] = [
            OffloadedOptimizer([p], build, pin_memory) if offload else build([p]) for p in self.params]
        inner = [o.inner if offload else o for o in self.optimizers]
        self.scheduler = _Schedulers([build_scheduler(o) for o in inner])
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.stepping = False  # set for the last micro-batch's backward
        self.steps_taken = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in self.params]

    def _step_one(self, param: torch.nn.Parameter) -> None:
        if not self.stepping or param.grad is None:
            return  # an earlier micro-batch: the gradient keeps accumulating
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        optimizer = self.optimizers[self._index[id(param)]]
        if self.offload:
            optimizer.stage_gradients()
        else:
            optimizer.step()
        param.grad = None
        first_step = self.steps_taken < len(self.params)  # this parameter's optimiser state was just made
        if first_step and (self.offload or param.device.type == "cpu"):
            # in the host's heap, above the backward's and the step's freed temporaries, which would stay resident
            # as heap holes (about 32 bytes per trainable parameter: +1.3 GiB on klein base 9B, +2.0 on FLUX.1 dev
            # on the CPU); handed back at once, they cost a few page faults when reused. State on a GPU leaves no
            # holes in the host's heap: no trim there
            release_freed_heap()
        self.steps_taken += 1  # parameters handled inside the backward

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizers[0].defaults

    def step(self) -> None:
        """Without offload the parameters were stepped during backward; with it, their CPU steps run now."""
        if not self.offload:
            return
        if any(p.device.type == "cuda" for p in self.params):
            torch.cuda.current_stream().synchronize()  # every staged gradient has arrived
        for optimizer in self.optimizers:
            optimizer.step_staged()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"fused": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, state["fused"], strict=True):
            optimizer.load_state_dict(saved)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def build_training_optimizer(params: Sequence[torch.nn.Parameter], build: BuildOptimizer,
                             build_scheduler: BuildScheduler, *, offload: bool, fused_backward: bool,
                             max_grad_norm: float, pin_memory: bool = True) -> tuple[Any, Any]:
    """(optimizer, lr_scheduler) for the plan: plain, offloaded, fused, or fused with offloaded steps."""
    if fused_backward:
        fused = FusedBackward(params, build, build_scheduler, max_grad_norm, offload, pin_memory)
        return fused, fused.scheduler
    optimizer = OffloadedOptimizer(params, build, pin_memory) if offload else build(list(params))
    return optimizer, build_scheduler(optimizer.inner if offload else optimizer)
