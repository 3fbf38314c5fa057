"""How each model family encodes prompts and images, predicts the flow and samples.

Every family module exposes the same functions (see `FamilyOps`); the session talks only to these, so a
new family is one new module and one line in `_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from PIL import Image

    from trainer.events import Event
    from trainer.registry import Flavour
    from trainer.sources import ModelFiles

_MODULES = {"flux2": "trainer.families.flux2", "flux1": "trainer.families.flux1"}


class FamilyOps(Protocol):
    def load_pipeline(self, source: str, flavour: Flavour, dtype: torch.dtype, skip: tuple[str, ...] = (),
                      base_precision: str = "bf16", files: ModelFiles | None = None,
                      emit: Callable[[Event], None] | None = None, text_encoder_precision: str = "bf16",
                      modulation: str | None = None) -> Any: ...

    def encode_prompts(self, pipe: Any, prompts: list[str], flavour: Flavour) -> dict[str, torch.Tensor]: ...

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor: ...

    def image_seq_len(self, latents: torch.Tensor) -> int: ...

    def shift_mu(self, image_seq_len: int, flavour: Flavour) -> float: ...

    # reference: an edit pair's reference latents, appended to the image tokens as the pipeline does (the
    # prediction covers the target's tokens only)
    def predict(self, transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor],
                guidance: torch.Tensor | None, reference: torch.Tensor | None = None) -> torch.Tensor: ...

    def sample(self, pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None,
               steps: int, guidance: float, seed: int, resolution: int,
               reference: Image.Image | None = None, on_step: Callable[..., dict] | None = None) -> Image.Image: ...

    # the sampler's packed latents of a height x width image as `decoder` (the VAE or a tiny one) takes them
    def decoder_latents(self, pipe: Any, packed: torch.Tensor, height: int, width: int,
                        decoder: Any) -> torch.Tensor: ...


def family_ops(family: str) -> FamilyOps:
    if family not in _MODULES:
        raise KeyError(f"unknown model family '{family}'; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[family])  # type: ignore[return-value]
