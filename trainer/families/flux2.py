"""FLUX.2: Qwen3 (klein) or Mistral (dev) hidden states, a 32-channel VAE with 2x2 patchify and BatchNorm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from trainer.registry import DEMO_TEXT_TOKENS, Flavour
from trainer.sources.assemble import load_pipeline as assemble_pipeline

# Both families load through one assembler (hub, folder or single files; quantised bases streamed): see
# trainer/sources/assemble.py for `load_pipeline(source, flavour, dtype, skip, base_precision, files, emit)`.
load_pipeline = assemble_pipeline


def _max_sequence_length(flavour: Flavour) -> int:
    # The demo's prompts fit in its few tokens; real flavours use the pipeline's default of 512.
    return DEMO_TEXT_TOKENS if flavour.is_demo else 512


def encode_prompts(pipe: Any, prompts: list[str], flavour: Flavour) -> dict[str, torch.Tensor]:
    """Stacked hidden states of the flavour's text encoder layers, as the pipeline itself computes them."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompt=prompts, device=pipe.text_encoder.device, max_sequence_length=_max_sequence_length(flavour),
            text_encoder_out_layers=flavour.text_encoder_layers,
        )
    return {"prompt_embeds": embeds}


def encode_images(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) to normalised, patchified latents (B, 128, H/16, W/16)."""
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        latents = pipe._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    return (latents - mean) / std


def image_seq_len(latents: torch.Tensor) -> int:
    return latents.shape[-2] * latents.shape[-1]


def shift_mu(image_seq_len: int, flavour: Flavour) -> float:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    # The pipeline's own resolution-dependent shift, at the flavour's default number of sampling steps.
    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=flavour.sample_steps)


def _position_ids(latents: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import Flux2KleinPipeline

    img_ids = Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(text_embeds).to(latents.device)
    return img_ids, txt_ids


def _reference_tokens(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference latents (B, C, h, w) as the pipeline appends them: packed tokens and position ids whose time
    coordinate is 10 (`_prepare_image_ids`: 10 + 10·i for the i-th reference), every row of the batch alike."""
    from diffusers import Flux2KleinPipeline

    batch, channels, height, width = reference.shape
    ids = Flux2KleinPipeline._prepare_image_ids([reference[:1]]).to(reference.device).repeat(batch, 1, 1)
    return reference.reshape(batch, channels, height * width).permute(0, 2, 1), ids


def predict(transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor],
            guidance: torch.Tensor | None, reference: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's flow prediction for latents (B, C, h, w), returned in the same layout.

    `reference`: an edit pair's reference latents (B, C, h', w'), appended after the image tokens exactly as the
    FLUX.2 pipelines append their `image=` latents; the prediction returned (and so the loss) covers the target's
    tokens only, as the pipeline keeps only those.
    """
    batch, channels, height, width = noisy.shape
    embeds = text["prompt_embeds"]
    img_ids, txt_ids = _position_ids(noisy, embeds)
    tokens = noisy.reshape(batch, channels, height * width).permute(0, 2, 1)
    if reference is not None:
        reference_tokens, reference_ids = _reference_tokens(reference)
        tokens = torch.cat([tokens, reference_tokens.to(tokens)], dim=1)
        img_ids = torch.cat([img_ids, reference_ids], dim=1)
    out = transformer(
        hidden_states=tokens.to(transformer.dtype), encoder_hidden_states=embeds.to(transformer.dtype),
        timestep=sigmas.to(transformer.dtype), img_ids=img_ids, txt_ids=txt_ids,
        guidance=guidance if transformer.config.guidance_embeds else None, return_dict=False,
    )[0]
    out = out[:, :height * width]
    return out.permute(0, 2, 1).reshape(batch, channels, height, width)


def sample(pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None,
           steps: int, guidance: float, seed: int, resolution: int,
           reference: Image.Image | None = None, on_step: Callable[..., dict] | None = None) -> Image.Image:
    """One image; with `reference` (an edit flavour), it goes to the pipeline's `image=` and sets the size.
    `on_step`: called after every denoising step with the latents (trainer/previews.py), which it leaves alone."""
    device = pipe.transformer.device
    kwargs: dict[str, Any] = {"guidance_scale": guidance}
    if on_step is not None:
        kwargs["callback_on_step_end"] = on_step
    if negative is not None:  # klein base: real classifier-free guidance against the empty prompt
        kwargs["negative_prompt_embeds"] = negative["prompt_embeds"].to(device)
    width, height = reference.size if reference is not None else (resolution, resolution)
    if reference is not None:
        kwargs["image"] = reference
    return pipe(
        prompt_embeds=text["prompt_embeds"].to(device), num_inference_steps=steps, height=height,
        width=width, generator=torch.Generator("cpu").manual_seed(seed), **kwargs,
    ).images[0]


def decoder_latents(pipe: Any, packed: torch.Tensor, height: int, width: int, decoder: Any) -> torch.Tensor:  # noqa: ANN401
    """The sampler's packed latents (B, tokens, 128) of a `height` x `width` px image as the VAE's decoder takes
    them (B, 32, H/8, W/8), by the pipeline's own steps: tokens in raster order (text-to-image ids), the
    batch-norm statistics undone, the 2x2 patches unfolded. A tiny decoder for FLUX.2 takes the same latents."""
    del decoder
    side = pipe.vae_scale_factor * 2
    batch, _, channels = packed.shape
    latents = packed.reshape(batch, int(height) // side, int(width) // side, channels).permute(0, 3, 1, 2)
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    return pipe._unpatchify_latents(latents * std + mean)
