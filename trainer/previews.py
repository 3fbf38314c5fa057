"""Live sampling previews (`sample.preview_every`, `sample.preview_decoder`): while a sample renders, the image
it is heading for, every N denoising steps, decoded small.

The pipeline calls back after each denoising step (diffusers' `callback_on_step_end`, reading the latents only:
the sample itself is untouched, bit for bit). From two consecutive Euler states of the flow-matching sampler the
clean image it heads for is estimated (x0 = x_next - sigma_next * velocity), turned into the latents the decoder
takes by the family (`decoder_latents`), downscaled to half the sample's size or less (at most about PREVIEW_SIDE
pixels on its longest side: a quarter of the final decode's cost or less), and decoded where the VAE already is
for sampling: by the model's own VAE, or by a tiny autoencoder (diffusers' AutoencoderTiny, e.g.
madebyollin/taef1) when one is configured.
Each preview is a small JPEG in `samples/previews/`, announced by a `SamplePreview` event; a prompt's previews
are deleted once its final sample is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.events import Event, LogMessage, SamplePreview
from trainer.files import write_atomic
from trainer.prompts import SamplePrompt

PREVIEW_SIDE = 512  # px: the longest side of a preview, about (half the sample's, or less)
FOLDER = "previews"  # under output.dir/samples
SUFFIX = ".jpg"
JPEG_QUALITY = 85


def preview_steps(every: int, steps: int) -> list[int]:
    """The denoising steps (1-based) after which a preview is shown: every `every`-th, before the last (the final
    sample replaces it), and from the second on (the estimate needs the state before the step)."""
    if every <= 0:
        return []
    return [step for step in range(every, steps, every) if step >= 2]


def denoised_estimate(previous: torch.Tensor, latents: torch.Tensor, sigma: float, sigma_next: float
                      ) -> torch.Tensor:
    """The clean latents the sampler heads for, from the states before and after one Euler step of flow matching:
    x_next = x + (sigma_next - sigma) * v, and the clean image is x_next - sigma_next * v."""
    velocity = (latents.float() - previous.float()) / (sigma_next - sigma)
    return latents.float() - sigma_next * velocity


def downscaled(latents: torch.Tensor, scale_factor: int, side: int) -> torch.Tensor:
    """Decoder latents (B, C, h, w) averaged down to half their size or less, so that their image is at most
    about `side` px on its longest side: a preview costs a quarter of the final decode or less."""
    factor = max(2, math.ceil(max(latents.shape[-2:]) * scale_factor / side))
    size = (max(1, math.ceil(latents.shape[-2] / factor)), max(1, math.ceil(latents.shape[-1] / factor)))
    return torch.nn.functional.interpolate(latents, size=size, mode="area")


def to_image(pixels: torch.Tensor) -> Any:  # noqa: ANN401 - a PIL image
    """The first image of a decoder's output in [-1, 1] as an RGB PIL image (as the pipelines post-process)."""
    from PIL import Image

    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def load_tiny_decoder(source: str, dtype: torch.dtype, latent_channels: int) -> Any:  # noqa: ANN401
    """sample.preview_decoder: a diffusers AutoencoderTiny (hub id or folder) taking the model VAE's latents."""
    from diffusers import AutoencoderTiny

    try:
        model = AutoencoderTiny.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"sample.preview_decoder: cannot load a diffusers AutoencoderTiny from '{source}' ({exc}); "
                        "give a hub id such as madebyollin/taef1 (FLUX.1), a folder saved by diffusers, or leave it "
                        "empty to preview with the model's own VAE") from None
    if model.config.latent_channels != latent_channels:
        raise UserError(f"sample.preview_decoder: '{source}' decodes {model.config.latent_channels}-channel latents, "
                        f"this model's VAE makes {latent_channels}; give the tiny autoencoder made for this family "
                        "or leave it empty")
    return model.requires_grad_(False).eval()


@dataclass
class LivePreviews:
    """One validation's previews: a callback for each sample's pipeline, the files, the events.

    `decoder` is the model's VAE or the tiny autoencoder, already where the VAE is for sampling; `ops` the
    family's functions (decoder_latents); `prompts` how many samples the validation renders."""

    ops: Any
    pipe: Any
    decoder: Any
    folder: Path
    emit: Callable[[Event], None]
    every: int
    steps: int
    train_step: int
    prompts: int
    written: dict[int, list[Path]] = field(default_factory=dict)
    failed: bool = False

    def __post_init__(self) -> None:
        self._remove(sorted(self.folder.glob(f"step*{SUFFIX}")) if self.folder.is_dir() else [])  # a crash's

    def watch(self, index: int, prompt: SamplePrompt, width: int, height: int) -> Callable[..., dict]:
        """The `callback_on_step_end` for sample `index` (0-based) of `prompt` at width x height px."""
        wanted = set(preview_steps(self.every, self.steps))
        kept: dict[str, torch.Tensor] = {}

        def on_step(pipe: Any, i: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:  # noqa: ANN401
            step, latents = i + 1, tensors["latents"]
            if step in wanted and "previous" in kept and not self.failed:
                sigmas = pipe.scheduler.sigmas
                estimate = denoised_estimate(kept.pop("previous"), latents, float(sigmas[i]), float(sigmas[i + 1]))
                try:
                    self._show(index, prompt, width, height, step, estimate)
                except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory: a preview is not worth the sample
                    self._stop(f"{type(exc).__name__}: {exc}")
            if step + 1 in wanted:
                kept["previous"] = latents.detach().clone()
            return {}  # the sampler goes on with its own latents

        return on_step

    @torch.no_grad()
    def _show(self, index: int, prompt: SamplePrompt, width: int, height: int, step: int,
              estimate: torch.Tensor) -> None:
        decoder = self.decoder
        latents = self.ops.decoder_latents(self.pipe, estimate, height, width, decoder)
        latents = downscaled(latents, self.pipe.vae_scale_factor, PREVIEW_SIDE).to(decoder.device, decoder.dtype)
        image = to_image(decoder.decode(latents, return_dict=False)[0])
        path = self.folder / f"step{self.train_step:06d}_{prompt.name}_{step:03d}{SUFFIX}"
        try:  # not fsynced: a preview lives seconds; atomic, so the page never reads half a file
            write_atomic(path, lambda tmp: image.save(tmp, format="JPEG", quality=JPEG_QUALITY), durable=False)
        except OSError as exc:
            self._stop(f"cannot write {path} ({exc})")
            return
        self.written.setdefault(index, []).append(path)
        self.emit(SamplePreview(step=self.train_step, index=index + 1, count=self.prompts, prompt=prompt.text,
                                path=str(path), denoise_step=step, denoise_steps=self.steps))

    def _stop(self, why: str) -> None:
        """No more previews in this validation, said once; the samples themselves go on."""
        self.failed = True
        self.emit(LogMessage(level="warning", message=f"live sampling previews stopped: {why}"))

    def done(self, index: int) -> None:
        """Sample `index`'s final image is written: its previews go."""
        self._remove(self.written.pop(index, []))

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
