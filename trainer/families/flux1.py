"""FLUX.1: CLIP-L (pooled) + T5-XXL (sequence) prompts, a 16-channel VAE and 2x2-packed latent tokens."""

from __future__ import annotations

import math
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
    # T5 token budget: the demo's word-per-token prompts fit in its few; schnell was trained with 256, the dev
    # models with 512.
    if flavour.is_demo:
        return DEMO_TEXT_TOKENS
    return 256 if flavour.name == "schnell" else 512


def encode_prompts(pipe: Any, prompts: list[str], flavour: Flavour) -> dict[str, torch.Tensor]:
    """T5 sequence embeddings (B, L, D) and CLIP pooled embeddings (B, D_clip), as the pipeline computes them."""
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=pipe.text_encoder.device,
            max_sequence_length=_max_sequence_length(flavour),
        )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def encode_images(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) to shifted and scaled latents (B, 16, H/8, W/8)."""
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def image_seq_len(latents: torch.Tensor) -> int:
    """Number of image tokens once the latents are packed into 2x2 patches."""
    return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)


# schnell's scheduler config: use_dynamic_shifting false, shift 1.0 (its sigmas are not shifted at all)
_FIXED_SHIFT = 1.0
# The dev scheduler's line: mu from base_shift at base_image_seq_len tokens to max_shift at max_image_seq_len.
SHIFT_LINE = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
# The demo's 64 px (16 tokens) gets the shift the FLUX.2 demo's pipeline gives it (exp(1.95) = 7): on the dev line it
# would get 1.6, so training would almost never see the noise levels near 1 where sampling starts (the picture's
# layout and colours are decided there) and the demo would not learn its captions. Its scheduler config says so too.
DEMO_SHIFT_LINE = {"base_shift": 0.5, "max_shift": 1.95, "base_image_seq_len": 1, "max_image_seq_len": 16}


def shift_mu(image_seq_len: int, flavour: Flavour) -> float:
    """log of the shift the flavour's scheduler samples with at this many image tokens (training uses exp(mu))."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if flavour.timestep_shift == "fixed":
        # The pipeline still computes a mu, but schnell's scheduler ignores it: train on the schedule it samples.
        return math.log(_FIXED_SHIFT)
    # The dev scheduler's resolution-dependent shift; its config is that of every dynamic FLUX.1 flavour.
    line = DEMO_SHIFT_LINE if flavour.is_demo else SHIFT_LINE
    return calculate_shift(image_seq_len, base_seq_len=line["base_image_seq_len"],
                           max_seq_len=line["max_image_seq_len"], base_shift=line["base_shift"],
                           max_shift=line["max_shift"])


def _reference_tokens(reference: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference latents (B, 16, h, w) as FluxKontextPipeline appends them: 2x2-packed tokens, and the position ids
    of a latent grid of that size with the first (index) coordinate set to 1 (the target's is 0)."""
    from diffusers import FluxPipeline

    batch, channels, height, width = reference.shape
    tokens = FluxPipeline._pack_latents(reference, batch, channels, height, width)
    ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, reference.device, dtype)
    ids[..., 0] = 1
    return tokens, ids


def predict(transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor],
            guidance: torch.Tensor | None, reference: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's flow prediction for latents (B, 16, h, w), returned in the same layout.

    `reference` (Kontext): an edit pair's reference latents (B, 16, h', w'), appended after the image tokens as
    the Kontext pipeline appends its `image=` latents; the prediction returned (and so the loss) covers the
    target's tokens only, as the pipeline keeps only those.
    """
    from diffusers import FluxPipeline

    batch, channels, height, width = noisy.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX.1 packs 2x2 latent patches; latent size {height}x{width} must be even")
    dtype, device = transformer.dtype, noisy.device
    embeds = text["prompt_embeds"]
    tokens = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
    target_tokens = tokens.shape[1]
    if reference is not None:
        reference_tokens, reference_ids = _reference_tokens(reference, dtype)
        tokens = torch.cat([tokens, reference_tokens.to(tokens)], dim=1)
        img_ids = torch.cat([img_ids, reference_ids], dim=0)  # FLUX.1 ids have no batch dimension
    # The pipeline passes t / 1000 with t = sigma * 1000, i.e. sigma itself; the transformer rescales by 1000,
    # and it does the same to the raw guidance scale.
    out = transformer(
        hidden_states=tokens.to(dtype), encoder_hidden_states=embeds.to(dtype),
        pooled_projections=text["pooled_prompt_embeds"].to(dtype), timestep=sigmas.to(dtype),
        img_ids=img_ids, txt_ids=txt_ids,
        guidance=guidance if transformer.config.guidance_embeds else None, return_dict=False,
    )[0]
    # _unpack_latents takes pixel sizes and the VAE factor; latent sizes with a factor of 1 give the same layout.
    return FluxPipeline._unpack_latents(out[:, :target_tokens], height, width, 1)


def sample(pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None,
           steps: int, guidance: float, seed: int, resolution: int,
           reference: Image.Image | None = None, on_step: Callable[..., dict] | None = None) -> Image.Image:
    """One image; with `reference` (Kontext), it goes to the pipeline's `image=` and sets the size.
    `on_step`: called after every denoising step with the latents (trainer/previews.py), which it leaves alone."""
    device = pipe.transformer.device
    del negative  # FLUX.1 dev is guidance-distilled: the scale goes in as an embedding, no true CFG pass
    width, height = reference.size if reference is not None else (resolution, resolution)
    kwargs: dict[str, Any] = {} if on_step is None else {"callback_on_step_end": on_step}
    if type(pipe).__name__ == "FluxKontextPipeline":
        # Kontext otherwise rescales the output to 1024² and snaps the reference to its preferred sizes; the
        # reference is already cut to a bucket of the sample resolution, as training cut its pairs.
        kwargs.update(max_area=width * height, _auto_resize=False)
        if reference is not None:
            kwargs["image"] = reference
    elif reference is not None:
        raise ValueError(f"{type(pipe).__name__} takes no reference image; FLUX.1 edits need FluxKontextPipeline")
    return pipe(
        prompt_embeds=text["prompt_embeds"].to(device), pooled_prompt_embeds=text["pooled_prompt_embeds"].to(device),
        guidance_scale=guidance, num_inference_steps=steps, height=height, width=width,
        generator=torch.Generator("cpu").manual_seed(seed), **kwargs,
    ).images[0]


def decoder_latents(pipe: Any, packed: torch.Tensor, height: int, width: int, decoder: Any) -> torch.Tensor:  # noqa: ANN401
    """The sampler's packed latents (B, tokens, 64) of a `height` x `width` px image as `decoder` takes them
    (B, 16, H/8, W/8), by the pipeline's own steps with the decoder's own scale and shift (a tiny autoencoder
    such as taef1 has its own)."""
    from diffusers import FluxPipeline

    latents = FluxPipeline._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    return latents / decoder.config.scaling_factor + decoder.config.shift_factor
