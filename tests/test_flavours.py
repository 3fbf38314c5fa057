"""Every real flavour's mechanics against its own diffusers pipeline, on tiny models of the real classes.

For FLUX.2 dev (Flux2Pipeline, Mistral3), klein base 9B / 4B (Flux2KleinPipeline, Qwen3) and FLUX.1 dev / krea /
schnell / kontext (FluxPipeline, FluxKontextPipeline: CLIP + T5), the family functions must compute what the
pipeline computes: the prompt embedding, the normalised latents (and the pipeline decodes ours back to the VAE's
image), the transformer call of a denoising step (position ids, timestep, guidance), and the schedule's shift.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from tests.flavour_models import IMAGE_SIZE, JOINT_DIM, pipeline_for
from trainer import flow
from trainer.families import family_ops
from trainer.registry import DEMO_TEXT_TOKENS, get_flavour

PROMPTS = ["a red circle", "a green square on a blue background"]
FLUX2 = [("flux2", "dev"), ("flux2", "klein-base-9b"), ("flux2", "klein-base-4b")]
FLUX1 = [("flux1", "dev"), ("flux1", "krea"), ("flux1", "schnell"), ("flux1", "kontext")]
REAL = FLUX2 + FLUX1
# Kontext's reference-image conditioning is tested with the reference-image support; here it is text-to-image only.
TEXT_TO_IMAGE = [case for case in REAL if case != ("flux1", "kontext")]
# klein base 9B and 4B differ only in their sizes (test_klein_base_9b_and_4b_differ_only_in_size) and share one tiny
# pipeline here: the slower tests of prompts and sampling run them once
ONE_KLEIN = [case for case in TEXT_TO_IMAGE if case != ("flux2", "klein-base-9b")]
T5_TOKENS = {"dev": 512, "krea": 512, "kontext": 512, "schnell": 256}  # the model cards' max_sequence_length


def _ids(case: tuple[str, str]) -> str:
    return "-".join(case)


def _pixels(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1


@functools.cache
def _encoded(family: str, name: str) -> dict[str, torch.Tensor]:
    """Our encode_prompts of PROMPTS, once per flavour (a 40-layer text encoder over 512 tokens is not free)."""
    return family_ops(family).encode_prompts(pipeline_for(family, name), PROMPTS, get_flavour(family, name))


def _text(family: str, batch: int, length: int = 8) -> dict[str, torch.Tensor]:
    """Random prompt embeddings of the tiny transformers' widths, for tests about the denoiser rather than text."""
    generator = torch.Generator().manual_seed(4)
    if family == "flux2":
        return {"prompt_embeds": torch.randn(batch, length, JOINT_DIM, generator=generator)}
    return {"prompt_embeds": torch.randn(batch, length, 32, generator=generator),
            "pooled_prompt_embeds": torch.randn(batch, 32, generator=generator)}


@contextmanager
def transformer_calls(transformer: Any, zero_output: bool = False) -> Iterator[list[tuple[dict[str, Any], Any]]]:
    """Record (kwargs, output) of every transformer forward; `zero_output` makes it predict a zero velocity, so a
    sampling step leaves the latents as they were and the pipeline decodes exactly what it was given."""
    calls: list[tuple[dict[str, Any], Any]] = []

    def hook(module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        calls.append((dict(kwargs), output[0].detach().clone()))
        return (torch.zeros_like(output[0]),) if zero_output else None

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


class _Scheduled(Exception):  # noqa: N818 - a control-flow signal, not an error
    pass


def scheduled(pipe: Any, **call: Any) -> tuple[float | None, torch.Tensor]:
    """The mu the pipeline hands its scheduler and the sigmas that come of it; the run stops there."""
    scheduler = pipe.scheduler
    original = scheduler.set_timesteps
    seen: dict[str, Any] = {}

    @functools.wraps(original)  # retrieve_timesteps reads the signature to see that sigmas are accepted
    def capture(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        seen.update(mu=kwargs.get("mu"), sigmas=scheduler.sigmas.clone())
        raise _Scheduled

    scheduler.set_timesteps = capture
    try:
        with pytest.raises(_Scheduled):
            pipe(**call)
    finally:
        del scheduler.set_timesteps
    return seen["mu"], seen["sigmas"]


# --- the registry against the pipeline classes ------------------------------------------------------------------


@pytest.mark.parametrize("case", REAL, ids=_ids)
def test_the_flavour_names_the_classes_of_its_pipeline(case: tuple[str, str]) -> None:
    flavour = get_flavour(*case)
    pipe = pipeline_for(*case)
    assert type(pipe).__name__ == flavour.pipeline_class
    assert type(pipe.transformer).__name__ == flavour.transformer_class
    assert type(pipe.vae).__name__ == flavour.vae_class
    encoders = (pipe.text_encoder,) if case[0] == "flux2" else (pipe.text_encoder, pipe.text_encoder_2)
    assert tuple(type(e).__name__ for e in encoders) == flavour.text_encoders
    assert pipe.vae.config.latent_channels == flavour.latent_channels
    # guidance: embedded for FLUX.1 dev / krea / kontext and FLUX.2 dev, real CFG for klein base, none for schnell
    assert pipe.transformer.config.guidance_embeds == (flavour.guidance == "embedded")
    assert (flavour.guidance == "cfg") == (case[0] == "flux2" and not pipe.config.get("is_distilled", True))


@pytest.mark.parametrize("case", FLUX2, ids=_ids)
def test_flux2_hidden_state_layers_are_the_pipelines_own(case: tuple[str, str]) -> None:
    flavour = get_flavour(*case)
    pipeline_class = type(pipeline_for(*case))
    default = inspect.signature(pipeline_class.encode_prompt).parameters["text_encoder_out_layers"].default
    assert flavour.text_encoder_layers == tuple(default) == {"dev": (10, 20, 30)}.get(case[1], (9, 18, 27))
    assert flavour.joint_attention_dim == 3 * {"dev": 5120, "klein-base-9b": 4096, "klein-base-4b": 2560}[case[1]]


def test_sampling_defaults_are_the_model_cards() -> None:
    # Sources (the hub model cards' diffusers examples, and the pipelines' own defaults where a card omits one):
    # FLUX.2-dev: num_inference_steps=50 with "28 steps can be a good trade-off", guidance_scale=4;
    # FLUX.2-klein-base-9B / -4B: 50 steps, guidance_scale=4.0 (also Flux2KleinPipeline's docstring example);
    # FLUX.1-dev: guidance_scale=3.5, num_inference_steps=50; FLUX.1-Krea-dev: guidance_scale=4.5, steps left at
    # FluxPipeline's default 28; FLUX.1-schnell: guidance_scale=0.0, num_inference_steps=4, max_sequence_length=256;
    # FLUX.1-Kontext-dev: guidance_scale=2.5, steps left at FluxKontextPipeline's default 28.
    expected = {
        ("flux2", "dev"): (28, 4.0), ("flux2", "klein-base-9b"): (50, 4.0), ("flux2", "klein-base-4b"): (50, 4.0),
        ("flux1", "dev"): (50, 3.5), ("flux1", "krea"): (28, 4.5), ("flux1", "schnell"): (4, 0.0),
        ("flux1", "kontext"): (28, 2.5),
    }
    got = {case: (get_flavour(*case).sample_steps, get_flavour(*case).sample_guidance) for case in expected}
    assert got == expected
    assert all(get_flavour(*case).sample_resolution == 1024 for case in expected)


def test_klein_base_9b_and_4b_differ_only_in_size() -> None:
    nine, four = get_flavour("flux2", "klein-base-9b"), get_flavour("flux2", "klein-base-4b")
    sizes = {"name", "label", "hub_id", "text_encoder_label", "double_blocks", "single_blocks", "hidden_size",
             "num_heads", "joint_attention_dim", "params_billion", "max_blocks_to_swap"}
    differ = {f.name for f in dataclasses.fields(nine) if getattr(nine, f.name) != getattr(four, f.name)}
    assert differ == sizes


# --- prompts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [*ONE_KLEIN, ("flux1", "kontext")], ids=_ids)
def test_encode_prompts_is_the_pipelines_encode_prompt(case: tuple[str, str]) -> None:
    family, name = case
    pipe = pipeline_for(*case)
    ours = _encoded(*case)
    with torch.no_grad():
        if family == "flux2":  # the pipeline's defaults: its own layers and 512 tokens
            embeds, text_ids = pipe.encode_prompt(prompt=PROMPTS)
            expected = {"prompt_embeds": embeds}
            assert embeds.shape == (2, 512, JOINT_DIM)
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None,
                                                          max_sequence_length=T5_TOKENS[name])
            expected = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            assert embeds.shape == (2, T5_TOKENS[name], 32) and pooled.shape == (2, 32)
    assert ours.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], atol=0, rtol=0)


def _stacked(pipe: Any, text: list[str], layers: tuple[int, ...]) -> torch.Tensor:
    """Tokenise already-templated text ourselves, run the encoder, and stack the layers as FLUX.2 does."""
    inputs = pipe.tokenizer(text, padding="max_length", max_length=512, truncation=True, add_special_tokens=False,
                            return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   output_hidden_states=True, use_cache=False).hidden_states
    return torch.cat([hidden[k] for k in layers], dim=-1)  # per token: layer 1's features, then layer 2's, ...


def test_klein_renders_prompts_through_the_qwen3_chat_template() -> None:
    flavour = get_flavour("flux2", "klein-base-4b")
    pipe = pipeline_for("flux2", "klein-base-4b")
    # Qwen3's template for one user turn, generation prompt on, thinking off (an empty think block)
    templated = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n" for p in PROMPTS]
    ours = _encoded("flux2", "klein-base-4b")["prompt_embeds"]
    torch.testing.assert_close(ours, _stacked(pipe, templated, flavour.text_encoder_layers), atol=1e-6, rtol=0)
    assert not torch.allclose(ours, _stacked(pipe, PROMPTS, flavour.text_encoder_layers))


def test_flux2_dev_sends_the_system_message_and_prompt_through_mistral() -> None:
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    flavour = get_flavour("flux2", "dev")
    pipe = pipeline_for("flux2", "dev")
    templated = [f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{p}[/INST]" for p in PROMPTS]
    ours = _encoded("flux2", "dev")["prompt_embeds"]
    torch.testing.assert_close(ours, _stacked(pipe, templated, flavour.text_encoder_layers), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", FLUX1, ids=_ids)
def test_flux1_prompts_are_the_t5_sequence_and_the_pooled_clip(case: tuple[str, str]) -> None:
    pipe = pipeline_for(*case)
    length = T5_TOKENS[case[1]]
    clip_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():  # FLUX.1 passes no attention mask to either encoder: T5 sees its padding
        pooled = pipe.text_encoder(clip_ids).pooler_output
        sequence = pipe.text_encoder_2(t5_ids)[0]
    ours = _encoded(*case)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["prompt_embeds"], sequence, atol=1e-6, rtol=0)


# --- latents ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REAL, ids=_ids)
def test_encode_images_normalises_as_the_pipeline_expects(case: tuple[str, str]) -> None:
    family = case[0]
    pipe = pipeline_for(*case)
    ops = family_ops(family)
    pixels = _pixels(2)
    latents = ops.encode_images(pipe, pixels)
    vae = pipe.vae
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
        if family == "flux2":  # 2x2 patchify to 128 channels, then the VAE's BatchNorm running statistics
            assert latents.shape == (2, 128, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
            torch.testing.assert_close(latents, pipe._encode_vae_image(pixels, generator=None), atol=0, rtol=0)
            patched = pipe._patchify_latents(raw)
            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            torch.testing.assert_close(latents, (patched - mean) / std, atol=1e-6, rtol=0)
        else:  # (x - 0.1159) * 0.3611
            assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.1159, 0.3611)
            assert latents.shape == (2, 16, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
            torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", TEXT_TO_IMAGE, ids=_ids)
def test_the_pipeline_decodes_our_latents_to_the_vaes_image(case: tuple[str, str]) -> None:
    family = case[0]
    pipe = pipeline_for(*case)
    pixels = _pixels(2)
    latents = family_ops(family).encode_images(pipe, pixels)
    batch, channels, height, width = latents.shape
    given = latents if family == "flux2" else pipe._pack_latents(latents, batch, channels, height, width)
    with transformer_calls(pipe.transformer, zero_output=True), torch.no_grad():
        image = pipe(**_text(family, batch), latents=given, num_inference_steps=1,
                     guidance_scale=1.0, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt").images
        reference = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
    torch.testing.assert_close(image, (reference / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


# --- the denoiser -----------------------------------------------------------------------------------------------


def _unpacked(pipe: Any, family: str, tokens: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """A pipeline's token sequence back to our (B, C, h, w) latents."""
    if family == "flux2":
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], channels, size, size)
    return pipe._unpack_latents(tokens, size * pipe.vae_scale_factor, size * pipe.vae_scale_factor,
                                pipe.vae_scale_factor)


@pytest.mark.parametrize("case", TEXT_TO_IMAGE, ids=_ids)
def test_predict_is_the_transformer_call_of_a_denoising_step(case: tuple[str, str]) -> None:
    family, name = case
    flavour = get_flavour(*case)
    pipe = pipeline_for(*case)
    ops = family_ops(family)
    batch, guidance_scale = 2, 2.5
    text = _text(family, batch)
    channels, size = (128, IMAGE_SIZE // 16) if family == "flux2" else (16, IMAGE_SIZE // 8)
    with transformer_calls(pipe.transformer) as calls, torch.no_grad():
        # two steps: the second one runs at a sigma below 1; guidance_scale > 1 would add klein's CFG pass
        pipe(**text, num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
             guidance_scale=guidance_scale if flavour.guidance == "embedded" else 1.0, output_type="latent",
             generator=torch.Generator().manual_seed(5))
        assert len(calls) == 2
        step, step_out = calls[-1]
        noisy = _unpacked(pipe, family, step["hidden_states"], channels, size)
        # the session's inputs: sigmas, and the guidance only for guidance-embedding flavours
        sigmas = step["timestep"]
        guidance = torch.full((batch,), guidance_scale) if flavour.guidance == "embedded" else None
        calls.clear()
        ours = ops.predict(pipe.transformer, noisy, sigmas, text, guidance)
    ours_call = calls[0][0]

    # the pipeline's timestep is t / 1000 = sigma: the noise level our flow-matching targets use
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas[1].expand(batch), atol=1e-6, rtol=0)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                "guidance"):
        expected, got = step.get(key), ours_call.get(key)
        if expected is None:
            assert got is None, key
            continue
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=key)
    if flavour.guidance == "embedded":
        assert step["guidance"].tolist() == [guidance_scale] * batch
    else:
        assert step["guidance"] is None
    assert ours.shape == noisy.shape
    torch.testing.assert_close(ours, _unpacked(pipe, family, step_out, channels, size), atol=0, rtol=0)


# --- the schedule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REAL, ids=_ids)
@pytest.mark.parametrize(("height", "width"), [(64, 64), (1024, 1024), (1024, 1536)])
def test_shift_mu_gives_the_pipelines_schedule(case: tuple[str, str], height: int, width: int) -> None:
    family, name = case
    flavour = get_flavour(*case)
    pipe = pipeline_for(*case)
    ops = family_ops(family)
    steps = flavour.sample_steps
    # Kontext rescales its output to max_area (1024² unless told); here the size is the one asked for
    sized = {"max_area": height * width} if name == "kontext" else {}
    mu, sigmas = scheduled(pipe, **_text(family, 1), num_inference_steps=steps,
                           height=height, width=width, guidance_scale=1.0, **sized)
    seq_len = (height // 16) * (width // 16)
    ours = ops.shift_mu(seq_len, flavour)
    if name != "schnell":
        assert ours == pytest.approx(mu, abs=1e-9)
    # training's auto shift exp(mu) is the shift the scheduler samples with
    base = torch.from_numpy(np.linspace(1.0, 1 / steps, steps)).float()
    torch.testing.assert_close(sigmas[:-1], flow.shift_sigmas(base, float(np.exp(ours))), atol=1e-6, rtol=0)


def test_schnell_has_no_resolution_dependent_shift() -> None:
    flux1 = family_ops("flux1")
    schnell, dev = get_flavour("flux1", "schnell"), get_flavour("flux1", "dev")
    assert {flux1.shift_mu(n, schnell) for n in (16, 256, 1024, 4096, 6144)} == {0.0}  # exp(0) = shift 1
    assert len({flux1.shift_mu(n, dev) for n in (256, 1024, 4096)}) == 3
    assert schnell.timestep_shift == "fixed" and dev.timestep_shift == "dynamic"


# --- sampling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ONE_KLEIN, ids=_ids)
def test_sample_runs_the_flavours_steps_and_guidance(case: tuple[str, str]) -> None:
    family, name = case
    flavour = get_flavour(*case)
    pipe = pipeline_for(*case)
    ops = family_ops(family)
    text = _text(family, 1)
    # klein base samples with real CFG against a negative (the session's: the empty prompt's embedding)
    negative = {key: -value for key, value in text.items()} if flavour.guidance == "cfg" else None
    with transformer_calls(pipe.transformer) as calls:
        image = ops.sample(pipe, text, negative, flavour.sample_steps, flavour.sample_guidance, seed=3,
                           resolution=IMAGE_SIZE)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    passes = 2 if flavour.guidance == "cfg" and flavour.sample_guidance > 1 else 1
    assert len(calls) == flavour.sample_steps * passes
    for index, (kwargs, _) in enumerate(calls):
        if flavour.guidance == "embedded":
            assert kwargs["guidance"].tolist() == [flavour.sample_guidance]
        else:
            assert kwargs["guidance"] is None
        # klein base: each step's second pass conditions on the negative embedding (real CFG)
        expected = negative if passes == 2 and index % 2 else text
        torch.testing.assert_close(kwargs["encoder_hidden_states"], expected["prompt_embeds"], atol=0, rtol=0)


@functools.cache
def _negative(family: str, name: str) -> dict[str, torch.Tensor]:
    """The empty prompt's embedding: the session's negative for real CFG (klein base)."""
    return family_ops(family).encode_prompts(pipeline_for(family, name), [""], get_flavour(family, name))


@functools.cache
def _demo_pipeline(family: str, folder: str) -> Any:
    pipe = family_ops(family).load_pipeline(folder, get_flavour(family, "demo"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", [("flux2", "demo"), ("flux1", "demo"), *ONE_KLEIN], ids=_ids)
def test_sample_gives_the_pipelines_image_for_the_prompt_and_seed(case: tuple[str, str], demo_dir: Any) -> None:
    """What the session renders (our embeddings, the empty prompt as klein base's negative, the flavour's guidance and
    token budget) is what the diffusers pipeline renders from the prompt text itself with the same seed."""
    family, name = case
    flavour = get_flavour(*case)
    pipe = _demo_pipeline(family, str(demo_dir / family)) if flavour.is_demo else pipeline_for(*case)
    ops = family_ops(family)
    steps, seed, guidance = 2, 3, flavour.sample_guidance
    # the session's embeddings: encoded with others in a batch (the real flavours' from the cache of these tests)
    text = {key: value[:1] for key, value in (ops.encode_prompts(pipe, PROMPTS, flavour) if flavour.is_demo
                                              else _encoded(family, name)).items()}
    negative = _negative(family, name) if flavour.guidance == "cfg" and guidance > 1 else None
    ours = ops.sample(pipe, text, negative, steps, guidance, seed, resolution=IMAGE_SIZE)
    # the demos' own token budget and (FLUX.2) hidden-state layers; the real flavours' are the pipelines' defaults
    # but for schnell's 256 T5 tokens
    tokens = DEMO_TEXT_TOKENS if flavour.is_demo else T5_TOKENS.get(name, 512)
    settings: dict[str, Any] = {"max_sequence_length": tokens}
    if flavour.is_demo and family == "flux2":
        settings["text_encoder_out_layers"] = flavour.text_encoder_layers
    theirs = pipe(prompt=PROMPTS[0], num_inference_steps=steps, guidance_scale=guidance, height=IMAGE_SIZE,
                  width=IMAGE_SIZE, generator=torch.Generator("cpu").manual_seed(seed), **settings).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
