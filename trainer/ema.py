"""An exponential moving average of the trainable (LoRA) weights: `train.ema_decay`.

After every optimiser step each EMA tensor moves towards its weight by (1 - decay). The EMA is kept in fp32 on the
GPU (fast, costs VRAM) or in system RAM (`train.ema_device = "cpu"`: the weights are copied over each step). It is
saved as its own LoRA files, can render the samples, and rides in the training state so resume stays exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

EMA_SUFFIX = "_ema"  # `<name>_ema.safetensors` beside `<name>.safetensors`


def ema_name(name: str) -> str:
    """The file stem of the EMA's LoRA files."""
    return f"{name}{EMA_SUFFIX}"


class LoraEma:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, device: torch.device) -> None:
        self.decay = decay
        self.device = device
        self.shadow = {name: p.detach().to(device, torch.float32, copy=True) for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        """shadow ← decay·shadow + (1 − decay)·weight, for every trainable tensor."""
        for name, param in params.items():
            shadow = self.shadow[name]
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """The EMA in place of the trained weights (for saving or sampling); the trained ones come back after."""
        trained = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(trained[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.to("cpu", copy=True) for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("the saved EMA does not match this adapter's tensors")
        for name, value in state.items():
            self.shadow[name].copy_(value)
