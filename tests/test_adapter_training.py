"""Adapter choices through the whole session: each trains, and diffusers' loader reproduces what was trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.demo import DEMO_RANK
from trainer.errors import UserError
from trainer.session import Session
from trainer.spec import SpecError, load_spec, resolve_paths

PROMPT = "shapez a red circle on a blue background"


def _spec(demo_dir: Path, out: Path, *overrides: str, job: str = "job.toml"):  # noqa: ANN202
    base = ["train.max_steps=4", "train.learning_rate=0.01", "sample.prompts=[]", f"output.dir='{out}'"]
    return resolve_paths(load_spec(demo_dir / job, base + list(overrides)), demo_dir)


def _latents(pipe, text: dict) -> torch.Tensor:  # noqa: ANN001
    return pipe(**text, num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


@pytest.mark.parametrize("overrides", [
    ("lora.type='lokr'",),
    ("lora.init='pissa'",),
    ("lora.init='olora'",),
    ("lora.targets='attention'",),
    ("lora.targets='transformer_blocks\\.\\d+\\.ff\\..*'",),
    ("advanced.tread=true", "advanced.tread_selection_ratio=0.5"),
], ids=["lokr", "pissa", "olora", "attention-preset", "regex", "tread"])
def test_trained_adapter_reloads_in_diffusers(demo_dir: Path, tmp_path: Path, overrides: tuple[str, ...]) -> None:
    # A sample prompt keeps the VAE (the pipeline needs it even for latents); the text encoder is freed anyway.
    session = Session(_spec(demo_dir, tmp_path, *overrides, f"sample.prompts=['{PROMPT}']"))
    try:
        path = session.run()
        assert session.pipe.text_encoder is None, "the text encoder is still held after caching"
        fresh = type(session.pipe).from_pretrained(demo_dir / "flux2")  # the untouched base
        fresh.set_progress_bar_config(disable=True)
        text = session.ops.encode_prompts(fresh, [PROMPT], session.flavour)
        with torch.no_grad():
            session.transformer.eval()
            trained = _latents(session.pipe, text)
            base = _latents(fresh, text)
            fresh.load_lora_weights(path.parent, weight_name=path.name)
            loaded = _latents(fresh, text)
    finally:
        session.end()
    assert (loaded - base).abs().max() > 1e-4, "the adapter does not change the output"
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-4)


def test_init_from_continues_an_existing_lora(demo_dir: Path, tmp_path: Path) -> None:
    first = Session(_spec(demo_dir, tmp_path / "a"))
    try:
        earlier = first.run()
    finally:
        first.end()
    second = Session(_spec(demo_dir, tmp_path / "b", f"lora.init_from='{earlier}'", "train.max_steps=1",
                           "train.learning_rate=1e-12"))
    try:
        later = second.run()
    finally:
        second.end()
    before, after = load_file(earlier), load_file(later)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)


def test_init_from_another_rank_is_refused_with_the_field(demo_dir: Path, tmp_path: Path) -> None:
    first = Session(_spec(demo_dir, tmp_path / "a", "train.max_steps=1"))
    try:
        earlier = first.run()
    finally:
        first.end()
    with pytest.raises(UserError, match="lora.init_from"):
        Session(_spec(demo_dir, tmp_path / "b", f"lora.init_from='{earlier}'", "lora.rank=4")).setup()


def test_spec_refuses_presets_of_the_other_family_and_bad_combinations(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="lora.targets: 'mmdit' is not a flux2 preset"):
        _spec(demo_dir, tmp_path, "lora.targets='mmdit'")
    with pytest.raises(SpecError, match="lora.init: 'pissa' applies to LoRA only"):
        _spec(demo_dir, tmp_path, "lora.type='lokr'", "lora.init='pissa'")
    with pytest.raises(SpecError, match="advanced.tread_start_block"):
        _spec(demo_dir, tmp_path, "advanced.tread=true", "advanced.tread_start_block=9")
    flux1 = _spec(demo_dir, tmp_path, "lora.targets='mmdit'", job="job_flux1.toml")
    assert flux1.lora.targets == "mmdit"


def test_every_format_is_written_copied_and_loads_in_diffusers(demo_dir: Path, tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI" / "models" / "loras"
    comfy.mkdir(parents=True)
    spec = _spec(demo_dir, tmp_path / "out", "lora.targets='mmdit'", "output.name='shapes'",
                 'output.formats=["diffusers", "comfyui", "kohya"]', f"output.comfy_lora_dir='{comfy}'",
                 "output.save_every_steps=2", job="job_flux1.toml")
    session = Session(spec)
    try:
        session.run()
        session.save(intermediate=True, copy_to_comfy=True)  # the Run tab's Save LoRA
    finally:
        session.end()
    from diffusers import FluxPipeline

    text = session.ops.encode_prompts(FluxPipeline.from_pretrained(demo_dir / "flux1"), [PROMPT], session.flavour)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("shapes*.safetensors")) == [
        "shapes-step000002.safetensors", "shapes-step000002_comfyui.safetensors", "shapes-step000002_kohya.safetensors",
        "shapes-step000004.safetensors", "shapes-step000004_comfyui.safetensors", "shapes-step000004_kohya.safetensors",
        "shapes.safetensors", "shapes_comfyui.safetensors", "shapes_kohya.safetensors"]
    # the final files and those of Save LoRA; interval saves stay in output.dir
    assert sorted(p.name for p in comfy.iterdir()) == [
        "shapes-step000004_comfyui.safetensors", "shapes-step000004_kohya.safetensors", "shapes_comfyui.safetensors",
        "shapes_kohya.safetensors"]
    from safetensors import safe_open

    with safe_open(out / "shapes_kohya.safetensors", "pt") as handle:
        header = handle.metadata()
        assert any(key.startswith("lora_unet_double_blocks_0_img_attn_qkv") for key in handle.keys())
    assert header["ss_network_dim"] == str(DEMO_RANK) and header["ss_steps"] == "4"
    assert "shapez" in header["modelspec.trigger_phrase"]
    outputs = {}
    with torch.no_grad():
        for name in ("shapes.safetensors", "shapes_comfyui.safetensors", "shapes_kohya.safetensors"):
            pipe = FluxPipeline.from_pretrained(demo_dir / "flux1")
            pipe.set_progress_bar_config(disable=True)
            pipe.load_lora_weights(out, weight_name=name)
            outputs[name] = _latents(pipe, text)
    for name in ("shapes_comfyui.safetensors", "shapes_kohya.safetensors"):
        torch.testing.assert_close(outputs[name], outputs["shapes.safetensors"], rtol=1e-5, atol=1e-5)


def test_a_missing_comfy_folder_is_refused_before_training(demo_dir: Path, tmp_path: Path) -> None:
    spec = _spec(demo_dir, tmp_path / "out", 'output.formats=["comfyui"]', f"output.comfy_lora_dir='{tmp_path / 'no'}'")
    with pytest.raises(UserError, match="output.comfy_lora_dir: .* is not a writable folder"):
        Session(spec).setup()
    with pytest.raises(SpecError, match="output.formats: 'kohya' is a FLUX.1 layout"):
        _spec(demo_dir, tmp_path / "out", 'output.formats=["kohya"]')
