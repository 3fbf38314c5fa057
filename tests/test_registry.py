"""The family/flavour registry: the facts the UI shows and the trainer builds from."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import registry
from trainer.registry import FAMILIES, flavour_names, get_flavour

REPO_ROOT = Path(__file__).resolve().parents[1]

REAL_FLAVOURS = {
    "flux2": ["dev", "klein-base-9b", "klein-base-4b"],
    "flux1": ["dev", "krea", "schnell", "kontext"],
}

ALL_FLAVOURS = [(fam, name) for fam in FAMILIES for name in FAMILIES[fam].flavours]
REAL = [(fam, name) for fam, names in REAL_FLAVOURS.items() for name in names]


def test_families_list_demo_first_then_the_real_flavours() -> None:
    assert list(FAMILIES) == ["flux2", "flux1"]
    for fam, real in REAL_FLAVOURS.items():
        assert flavour_names(fam) == ["demo", *real]
        demo = get_flavour(fam, "demo")
        assert demo.is_demo and demo.hub_id is None and demo.family == fam
        assert all(not get_flavour(fam, n).is_demo and get_flavour(fam, n).hub_id for n in real)


@pytest.mark.parametrize(("fam", "name"), ALL_FLAVOURS)
def test_flavour_knows_its_own_family_and_name(fam: str, name: str) -> None:
    flavour = get_flavour(fam, name)
    assert (flavour.family, flavour.name) == (fam, name)
    assert FAMILIES[fam].name == fam


def test_flux2_dev_facts() -> None:
    f = get_flavour("flux2", "dev")
    assert f.hub_id == "black-forest-labs/FLUX.2-dev"
    assert f.pipeline_class == "Flux2Pipeline"
    assert f.transformer_class == "Flux2Transformer2DModel"
    assert f.vae_class == "AutoencoderKLFlux2"
    assert (f.double_blocks, f.single_blocks, f.hidden_size, f.num_heads) == (8, 48, 6144, 48)
    assert f.text_encoders == ("Mistral3ForConditionalGeneration",)
    assert f.text_encoder_layers == (10, 20, 30)
    assert f.joint_attention_dim == 15360
    assert f.guidance == "embedded"
    assert (f.sample_steps, f.sample_guidance, f.sample_resolution) == (28, 4.0, 1024)
    assert f.params_billion == 32.0


@pytest.mark.parametrize(
    ("name", "hub_id", "blocks", "hidden", "heads", "joint", "te_label", "params"),
    [
        ("klein-base-9b", "black-forest-labs/FLUX.2-klein-base-9B", (8, 24), 4096, 32, 12288, "Qwen3-8B", 9.0),
        ("klein-base-4b", "black-forest-labs/FLUX.2-klein-base-4B", (5, 20), 3072, 24, 7680, "Qwen3-4B", 4.0),
    ],
)
def test_klein_base_facts(
    name: str,
    hub_id: str,
    blocks: tuple[int, int],
    hidden: int,
    heads: int,
    joint: int,
    te_label: str,
    params: float,
) -> None:
    f = get_flavour("flux2", name)
    assert f.hub_id == hub_id
    assert f.pipeline_class == "Flux2KleinPipeline"
    assert (f.double_blocks, f.single_blocks) == blocks
    assert (f.hidden_size, f.num_heads, f.joint_attention_dim) == (hidden, heads, joint)
    assert f.text_encoders == ("Qwen3ForCausalLM",)
    assert f.text_encoder_label == te_label
    assert f.text_encoder_layers == (9, 18, 27)
    # the base models are undistilled: real CFG, many steps
    assert f.guidance == "cfg"
    assert (f.sample_steps, f.sample_guidance, f.sample_resolution) == (50, 4.0, 1024)
    assert f.params_billion == params


@pytest.mark.parametrize("name", REAL_FLAVOURS["flux1"])
def test_flux1_shared_architecture(name: str) -> None:
    f = get_flavour("flux1", name)
    assert f.transformer_class == "FluxTransformer2DModel"
    assert f.vae_class == "AutoencoderKL"
    assert (f.double_blocks, f.single_blocks, f.hidden_size, f.num_heads) == (19, 38, 3072, 24)
    assert f.text_encoders == ("CLIPTextModel", "T5EncoderModel")
    assert f.text_encoder_layers == ()
    assert (f.joint_attention_dim, f.latent_channels) == (4096, 16)
    assert f.params_billion == 12.0


def test_flux1_variants_differ_where_they_should() -> None:
    dev, krea = get_flavour("flux1", "dev"), get_flavour("flux1", "krea")
    schnell, kontext = get_flavour("flux1", "schnell"), get_flavour("flux1", "kontext")
    assert dev.hub_id == "black-forest-labs/FLUX.1-dev"
    assert krea.hub_id == "black-forest-labs/FLUX.1-Krea-dev"
    assert schnell.hub_id == "black-forest-labs/FLUX.1-schnell"
    assert kontext.hub_id == "black-forest-labs/FLUX.1-Kontext-dev"
    for f in (dev, krea):
        assert (f.pipeline_class, f.guidance, f.timestep_shift) == ("FluxPipeline", "embedded", "dynamic")
        assert f.sample_resolution == 1024
        assert not f.needs_reference_image
    assert (dev.sample_steps, dev.sample_guidance) == (50, 3.5)  # the model cards (see tests/test_flavours.py)
    assert (krea.sample_steps, krea.sample_guidance) == (28, 4.5)
    assert (schnell.pipeline_class, schnell.guidance, schnell.timestep_shift) == ("FluxPipeline", "none", "fixed")
    assert (schnell.sample_steps, schnell.sample_guidance) == (4, 0.0)
    assert (kontext.pipeline_class, kontext.guidance) == ("FluxKontextPipeline", "embedded")
    assert (kontext.sample_steps, kontext.sample_guidance) == (28, 2.5)
    assert kontext.needs_reference_image


def test_only_kontext_needs_a_reference_image() -> None:
    needing = [(fam, name) for fam, name in ALL_FLAVOURS if get_flavour(fam, name).needs_reference_image]
    assert needing == [("flux1", "kontext")]


def test_demo_flavours_are_tiny_and_sample_fast() -> None:
    d2 = get_flavour("flux2", "demo")
    assert (d2.double_blocks, d2.single_blocks, d2.hidden_size, d2.num_heads) == (2, 2, 128, 4)
    assert (d2.text_encoders, d2.text_encoder_layers, d2.joint_attention_dim) == (("Qwen3ForCausalLM",), (1, 2, 3), 48)
    assert (d2.pipeline_class, d2.guidance, d2.latent_channels) == ("Flux2KleinPipeline", "cfg", 32)
    # guidance 1.0 turns CFG off, so a demo sample is one forward pass per step
    assert (d2.sample_steps, d2.sample_guidance, d2.sample_resolution) == (4, 1.0, 64)

    d1 = get_flavour("flux1", "demo")
    assert (d1.double_blocks, d1.single_blocks, d1.hidden_size, d1.num_heads) == (2, 2, 128, 4)
    assert (d1.text_encoders, d1.joint_attention_dim, d1.latent_channels) == (
        ("CLIPTextModel", "T5EncoderModel"),
        32,
        16,
    )
    assert (d1.pipeline_class, d1.guidance) == ("FluxPipeline", "embedded")
    assert (d1.sample_steps, d1.sample_guidance, d1.sample_resolution) == (4, 3.5, 64)
    for d in (d1, d2):
        assert d.params_billion < 0.01 and d.max_blocks_to_swap == 2


@pytest.mark.parametrize(("fam", "name"), REAL)
def test_real_flavours_use_head_dim_128(fam: str, name: str) -> None:
    f = get_flavour(fam, name)
    assert f.hidden_size == f.num_heads * 128


@pytest.mark.parametrize(("fam", "name"), ALL_FLAVOURS)
def test_latent_channels_and_components_follow_the_family(fam: str, name: str) -> None:
    f = get_flavour(fam, name)
    if fam == "flux2":
        assert f.latent_channels == 32 and f.vae_class == "AutoencoderKLFlux2"
        assert f.components == ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
        assert len(f.text_encoder_layers) == 3
    else:
        assert f.latent_channels == 16 and f.vae_class == "AutoencoderKL"
        assert f.components == (
            "transformer",
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "scheduler",
        )


@pytest.mark.parametrize(("fam", "name"), ALL_FLAVOURS)
def test_max_blocks_to_swap_is_within_the_transformer(fam: str, name: str) -> None:
    f = get_flavour(fam, name)
    assert 0 < f.max_blocks_to_swap < f.total_blocks
    assert f.max_blocks_to_swap == f.total_blocks - registry.RESIDENT_BLOCKS


def test_max_blocks_to_swap_values() -> None:
    bounds = {(fam, name): get_flavour(fam, name).max_blocks_to_swap for fam, name in REAL}
    assert bounds[("flux2", "dev")] == 54
    assert bounds[("flux2", "klein-base-9b")] == 30
    assert bounds[("flux2", "klein-base-4b")] == 23
    assert {bounds[("flux1", n)] for n in REAL_FLAVOURS["flux1"]} == {55}


def test_unknown_flavour_error_names_the_request_and_the_choices() -> None:
    with pytest.raises(KeyError) as info:
        get_flavour("flux2", "klein-9b")
    message = str(info.value)
    assert "klein-9b" in message
    for name in flavour_names("flux2"):
        assert name in message


def test_unknown_family_error_names_the_request_and_the_choices() -> None:
    with pytest.raises(KeyError) as info:
        get_flavour("flux3", "dev")
    message = str(info.value)
    assert "flux3" in message and "flux2" in message and "flux1" in message
    with pytest.raises(KeyError, match="flux3"):
        flavour_names("flux3")


def test_flavours_are_immutable() -> None:
    f = get_flavour("flux2", "klein-base-9b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.sample_steps = 1  # type: ignore[misc]


def test_inconsistent_flavour_is_rejected() -> None:
    base = get_flavour("flux1", "dev")
    with pytest.raises(ValueError, match="guidance"):
        dataclasses.replace(base, guidance="sometimes")
    with pytest.raises(ValueError, match="max_blocks_to_swap"):
        dataclasses.replace(base, max_blocks_to_swap=base.total_blocks + 1)


def test_import_does_not_load_heavy_libraries() -> None:
    code = (
        "import sys, trainer.registry as r; r.get_flavour('flux2', 'demo'); "
        "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
