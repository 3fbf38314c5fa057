"""FLUX.1 family ops against the tiny demo FluxPipeline: the same numbers the pipeline itself computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.families import family_ops, flux1
from trainer.registry import DEMO_TEXT_TOKENS, get_flavour

PROMPTS = ["a red circle", "a green square on blue"]  # under the demo's 64 T5 tokens
FLAVOUR = get_flavour("flux1", "demo")


@pytest.fixture(scope="module")
def flux1_dir(demo_dir: Path) -> Path:
    return demo_dir / "flux1"


@pytest.fixture(scope="module")
def pipe(flux1_dir: Path):
    pipe = flux1.load_pipeline(str(flux1_dir), FLAVOUR, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text(pipe) -> dict[str, torch.Tensor]:
    return flux1.encode_prompts(pipe, PROMPTS, FLAVOUR)


def _pixels(batch: int, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def test_registry_resolves_the_module() -> None:
    assert family_ops("flux1") is flux1


def test_encode_prompts_gives_batched_t5_sequence_and_clip_pooled(pipe, text) -> None:
    embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
    assert embeds.shape == (2, DEMO_TEXT_TOKENS, pipe.text_encoder_2.config.d_model)
    assert pooled.shape == (2, pipe.text_encoder.config.projection_dim)
    assert not embeds.requires_grad and not pooled.requires_grad
    # The session indexes items out of a batch: encoding one prompt alone must give the same row.
    single = flux1.encode_prompts(pipe, PROMPTS[1:], FLAVOUR)
    torch.testing.assert_close(single["prompt_embeds"][0], embeds[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(single["pooled_prompt_embeds"][0], pooled[1], atol=1e-5, rtol=0)


def test_t5_sequence_length_per_flavour() -> None:
    lengths = {name: flux1._max_sequence_length(get_flavour("flux1", name))
               for name in ("demo", "dev", "krea", "kontext", "schnell")}
    assert lengths == {"demo": DEMO_TEXT_TOKENS, "dev": 512, "krea": 512, "kontext": 512, "schnell": 256}


def test_predict_matches_the_pipelines_transformer_call(pipe, text) -> None:
    batch, channels, size = 2, 16, 8
    latents = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(2))
    seq_len = flux1.image_seq_len(latents)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=flux1.shift_mu(seq_len, FLAVOUR))
    t = scheduler.timesteps[1]
    guidance_scale = 3.5

    # The pipeline's own denoising step, written out as pipeline_flux.py does it.
    packed = pipe._pack_latents(latents, batch, channels, size, size)
    assert packed.shape[1] == seq_len
    img_ids = pipe._prepare_latent_image_ids(batch, size // 2, size // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(text["prompt_embeds"].shape[1], 3)
    guidance = torch.full([1], guidance_scale, dtype=torch.float32).expand(batch)
    with torch.no_grad():
        expected = pipe.transformer(
            hidden_states=packed, timestep=t.expand(batch) / 1000, guidance=guidance,
            pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=text["prompt_embeds"],
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        got = flux1.predict(pipe.transformer, latents, scheduler.sigmas[1].expand(batch), text, guidance)
        other_guidance = flux1.predict(pipe.transformer, latents, scheduler.sigmas[1].expand(batch), text,
                                       torch.full((batch,), 1.0))

    assert got.shape == latents.shape
    torch.testing.assert_close(got, pipe._unpack_latents(expected, 64, 64, pipe.vae_scale_factor),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(got, other_guidance)  # the guidance embedding is really fed


def test_encode_images_inverts_through_the_vae(pipe) -> None:
    pixels = _pixels(2)
    latents = flux1.encode_images(pipe, pixels)
    assert latents.shape == (2, 16, 8, 8)
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
        raw = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    assert decoded.shape == pixels.shape
    torch.testing.assert_close(decoded, raw, atol=1e-5, rtol=0)
    # shift then scale, in that order: the normalised latents are not the raw ones
    assert not torch.allclose(latents, vae.encode(pixels).latent_dist.mode())


def test_shift_mu_follows_the_schedulers_line(pipe) -> None:
    dev = get_flavour("flux1", "dev")
    assert flux1.shift_mu(256, dev) == pytest.approx(0.5)
    assert flux1.shift_mu(4096, dev) == pytest.approx(1.15)
    mus = [flux1.shift_mu(n, dev) for n in (16, 256, 1024, 4096)]
    assert mus == sorted(mus) and len(set(mus)) == len(mus)
    # the demo trains on the line its own scheduler samples with: its 16 tokens shifted as FLUX.2's demo (7)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    line = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    assert flux1.shift_mu(16, FLAVOUR) == pytest.approx(line) == pytest.approx(1.95)


def test_sample_is_deterministic_for_a_seed(pipe, text) -> None:
    one = {key: value[:1] for key, value in text.items()}
    first = flux1.sample(pipe, one, None, steps=2, guidance=3.5, seed=7, resolution=64)
    again = flux1.sample(pipe, one, {"prompt_embeds": one["prompt_embeds"]}, steps=2, guidance=3.5, seed=7,
                         resolution=64)
    other = flux1.sample(pipe, one, None, steps=2, guidance=3.5, seed=8, resolution=64)
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))  # the negative is ignored for FLUX.1
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_lora_training_with_predict_reduces_the_loss(flux1_dir: Path) -> None:
    from peft import LoraConfig

    pipe = flux1.load_pipeline(str(flux1_dir), FLAVOUR, torch.float32)  # own copy: the adapter changes it
    text = flux1.encode_prompts(pipe, PROMPTS, FLAVOUR)
    latents = flux1.encode_images(pipe, _pixels(2))
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights="gaussian"))
    params = [p for p in transformer.parameters() if p.requires_grad]
    assert params and all("lora" in name for name, p in transformer.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = torch.tensor([0.3, 0.8])
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    target = noise - latents
    guidance = torch.full((2,), 1.0)

    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(flux1.predict(transformer, noisy, sigmas, text, guidance), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.99, losses
