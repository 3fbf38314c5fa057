"""LoRA files in ComfyUI (BFL) and kohya layouts: a loader we did not write (diffusers' `load_lora_weights`, which
converts both) must reproduce the diffusers file's output, and BFL <-> diffusers names round-trip ΔW exactly."""

from __future__ import annotations

import copy
import json
import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trainer import lora_formats as lf
from trainer.adapters import adapter_export, add_adapter
from trainer.checkpoint import save_lora_diffusers
from trainer.errors import UserError
from trainer.registry import get_flavour

WIDTH = get_flavour("flux2", "demo").hidden_size  # the demo transformers' width (both families)

RANK, ALPHA = 4, 6.0  # scale 1.5: alpha != rank, and not a power of two
PROMPT = "a red circle on a blue background"
SPEC_TOML = 'spec_version = 1\n[model]\nfamily = "flux2"\n[output]\nname = "shapes"\n'


def _pipeline_class(family: str) -> type:
    from diffusers import Flux2KleinPipeline, FluxPipeline

    return Flux2KleinPipeline if family == "flux2" else FluxPipeline


def _demo_transformer(demo_dir: Path, family: str) -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    model = Flux2Transformer2DModel if family == "flux2" else FluxTransformer2DModel
    return model.from_pretrained(demo_dir / family / "transformer")


def _fresh(demo_dir: Path, family: str, transformer: torch.nn.Module, like=None):  # noqa: ANN001, ANN202
    """A new pipeline around `transformer`; the text encoders, tokenizers and VAE (which loading a transformer LoRA
    never touches) are taken from `like` when given, to save loading them again."""
    shared = {k: v for k, v in (like.components if like is not None else {}).items()
              if k not in ("transformer", "scheduler")}
    pipe = _pipeline_class(family).from_pretrained(demo_dir / family, transformer=transformer, **shared)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(pipe, family: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
    with torch.no_grad():
        if family == "flux2":
            layers = get_flavour("flux2", "demo").text_encoder_layers
            embeds, _ = pipe.encode_prompt(PROMPT, max_sequence_length=16, text_encoder_out_layers=layers)
            return {"prompt_embeds": embeds}
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, max_sequence_length=16)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _latents(pipe, family: str, text: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return pipe(**text, num_inference_steps=2, guidance_scale=1.0 if family == "flux2" else 3.5,
                    height=64, width=64, max_sequence_length=16, generator=torch.Generator().manual_seed(3),
                    output_type="latent").images


def _add_random_lora(transformer: torch.nn.Module, family: str, targets: str, seed: int = 1) -> None:
    """A LoRA that is not a no-op: peft's random A, and B drawn at random too (peft starts it at zero)."""
    add_adapter(transformer, family, type="lora", rank=RANK, alpha=ALPHA, dropout=0.0, targets=targets,
                init="default")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    transformer.eval()


def _metadata(family: str, fmt: str) -> dict[str, str]:
    return lf.build_metadata(family=family, flavour="demo", rank=RANK, alpha=ALPHA, steps=120,
                             trigger_words=["shapez", " red circle "], base_model="flux-2-klein-base-4b",
                             spec_toml=SPEC_TOML, format=fmt, title="shapes")


def _write_formats(pipe, family: str, out: Path) -> dict[str, Path]:
    """The adapter in every format the family supports, each with our metadata, named as the session names them."""
    tensors, peft_config = adapter_export(pipe.transformer)
    rank, alpha = peft_config["r"], peft_config["lora_alpha"]
    paths = {"diffusers": out / lf.lora_filename("shapes", "diffusers")}
    save_lora_diffusers(pipe.transformer, type(pipe), paths["diffusers"])
    lf.merge_metadata(paths["diffusers"], _metadata(family, "diffusers"))
    paths["comfyui"] = out / lf.lora_filename("shapes", "comfyui")
    lf.write_lora(paths["comfyui"], lf.to_comfyui(family, tensors, alpha, rank), _metadata(family, "comfyui"))
    if family == "flux1":
        paths["kohya"] = out / lf.lora_filename("shapes", "kohya")
        lf.write_lora(paths["kohya"], lf.to_kohya(tensors, alpha, rank), _metadata(family, "kohya"))
    return paths


def _check_loads_alike(paths: dict[str, Path], family: str, text: dict, base: torch.Tensor,
                       trained: torch.Tensor | None, fresh) -> None:  # noqa: ANN001
    """Each file loaded by diffusers into a fresh pipeline gives the diffusers file's output (within 1e-5)."""
    outputs = {}
    for fmt, path in paths.items():
        pipe = fresh()
        pipe.load_lora_weights(str(path))
        outputs[fmt] = _latents(pipe, family, text)
    reference = outputs["diffusers"]
    assert (reference - base).abs().max() > 1e-3, "the LoRA does not change the output"
    if trained is not None:
        torch.testing.assert_close(reference, trained, rtol=0, atol=1e-5)
    for fmt, latents in outputs.items():
        torch.testing.assert_close(latents, reference, rtol=0, atol=1e-5, msg=lambda m, fmt=fmt: f"{fmt}: {m}")


# FLUX.1 "all" hits single_blocks linear1, which diffusers 0.42's FLUX.1 kohya converter splits with hard-coded
# FLUX.1 [dev] widths (3072 ...): on the demo's width it cannot load; test_flux1_all_* below uses real widths.
@pytest.mark.parametrize(("family", "targets"), [
    ("flux2", "tiny"), ("flux2", "all"), ("flux1", "tiny"), ("flux1", "mmdit"),
])
def test_diffusers_loads_every_format_to_the_same_output(demo_dir: Path, tmp_path: Path, family: str,
                                                         targets: str) -> None:
    pipe = _fresh(demo_dir, family, _demo_transformer(demo_dir, family))
    text = _encode(pipe, family)
    base = _latents(pipe, family, text)
    _add_random_lora(pipe.transformer, family, targets)
    trained = _latents(pipe, family, text)
    paths = _write_formats(pipe, family, tmp_path)
    assert set(paths) == ({"diffusers", "comfyui", "kohya"} if family == "flux1" else {"diffusers", "comfyui"})
    _check_loads_alike(paths, family, text, base, trained,
                       lambda: _fresh(demo_dir, family, _demo_transformer(demo_dir, family), like=pipe))


def _wide_flux1_transformer() -> torch.nn.Module:
    """FLUX.1 [dev]'s widths (3072, 24 heads of 128), no double block and one single block, taking the demo's text
    encoders (joint/pooled dim 32). Filled from a tiled random vector scaled by 1/sqrt(fan_in): 4x faster than
    the default init on this 190M-parameter model, and random enough for comparing loaders."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=0, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = model.to_empty(device="cpu")
    assert not list(model.buffers())  # to_empty leaves buffers unset
    tile = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0))  # a prime period: no repeated rows
    with torch.no_grad():
        for param in model.parameters():
            count = param.numel()
            values = tile.repeat(-(-count // tile.numel()))[:count].view_as(param)
            param.copy_(values / param.shape[1] ** 0.5 if param.ndim == 2 else values * 0.02)
    return model.eval()


@pytest.mark.slow
def test_flux1_all_at_real_widths_loads_in_diffusers(demo_dir: Path, tmp_path: Path) -> None:
    """FLUX.1 "all" with linear1 at [dev]'s widths, where diffusers can split it (q, k, v, 4x MLP); the double
    blocks' names are covered by the mmdit case above."""
    untouched = _wide_flux1_transformer()
    # Fresh transformers share the untouched base weights (loading a LoRA wraps layers, never writes them).
    fresh_wide = lambda: copy.deepcopy(untouched, memo={id(p): p for p in untouched.parameters()})  # noqa: E731
    pipe = _fresh(demo_dir, "flux1", fresh_wide())
    text = _encode(pipe, "flux1")
    base = _latents(pipe, "flux1", text)
    _add_random_lora(pipe.transformer, "flux1", "all")
    with torch.no_grad():  # smaller B: 3072-wide layers with B ~ 0.2 would swamp the output
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    paths = _write_formats(pipe, "flux1", tmp_path)
    _check_loads_alike(paths, "flux1", text, base, None, lambda: _fresh(demo_dir, "flux1", fresh_wide(), like=pipe))


# ---------------------------------------------------------------------------------------------- key layouts


@pytest.fixture(scope="module")
def transformers(demo_dir: Path) -> dict[str, torch.nn.Module]:
    return {family: _demo_transformer(demo_dir, family) for family in ("flux2", "flux1")}


def _exported(transformers: dict, family: str, targets: str) -> dict[str, torch.Tensor]:
    transformer = copy.deepcopy(transformers[family])
    _add_random_lora(transformer, family, targets)
    return adapter_export(transformer)[0]


def _delta(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    modules = {key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}
    return {m: scale * tensors[f"{m}.lora_B.weight"].double() @ tensors[f"{m}.lora_A.weight"].double()
            for m in modules}


def _assert_same_delta(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for module, delta in want.items():
        error = (got[module] - delta).abs().max().item()
        assert error <= 1e-6 * max(1.0, delta.abs().max().item()), f"{module}: ΔW off by {error}"


def test_flux2_comfyui_keys_are_bfl_names_with_fused_qkv(transformers: dict) -> None:
    tensors = _exported(transformers, "flux2", "all")
    comfy = lf.to_comfyui("flux2", tensors, ALPHA, RANK)
    modules = {k.removesuffix(".lora_A.weight") for k in comfy if k.endswith(".lora_A.weight")}
    block = [f"diffusion_model.double_blocks.0.{n}" for n in ("img_attn.qkv", "img_attn.proj", "img_mlp.0",
             "img_mlp.2", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")]
    single = ["diffusion_model.single_blocks.0.linear1", "diffusion_model.single_blocks.0.linear2"]
    assert set(block + single) <= modules
    assert len(modules) == 2 * 8 + 2 * 2
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in comfy)
    qkv_a, qkv_b = comfy[f"{block[0]}.lora_A.weight"], comfy[f"{block[0]}.lora_B.weight"]
    assert qkv_a.shape == (3 * RANK, WIDTH) and qkv_b.shape == (3 * WIDTH, 3 * RANK)
    assert not qkv_b[:WIDTH, RANK:].any() and not qkv_b[WIDTH:2 * WIDTH, :RANK].any()  # block-diagonal
    # the scale is folded into lora_A (no alpha keys for FLUX.2: diffusers' converter refuses them)
    torch.testing.assert_close(qkv_a[:RANK], tensors["transformer_blocks.0.attn.to_q.lora_A.weight"] * ALPHA / RANK)


def test_flux1_kohya_and_comfyui_keys_carry_alphas_scaled_with_the_fused_rank(transformers: dict) -> None:
    tensors = _exported(transformers, "flux1", "all+ffs")
    kohya = lf.to_kohya(tensors, ALPHA, RANK)
    comfy = lf.to_comfyui("flux1", tensors, ALPHA, RANK)
    assert set(kohya) == {k.replace("diffusion_model.", "lora_unet_").replace(".", "_")
                          .replace("_lora_down_weight", ".lora_down.weight")
                          .replace("_lora_up_weight", ".lora_up.weight").replace("_alpha", ".alpha") for k in comfy}
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"
    linear1 = "lora_unet_single_blocks_0_linear1"
    assert kohya[f"{qkv}.lora_down.weight"].shape == (3 * RANK, WIDTH)
    assert kohya[f"{qkv}.alpha"].item() == pytest.approx(3 * ALPHA)
    assert kohya[f"{linear1}.lora_down.weight"].shape == (4 * RANK, WIDTH)  # q, k, v and proj_mlp
    assert kohya[f"{linear1}.lora_up.weight"].shape == (3 * WIDTH + 4 * WIDTH, 4 * RANK)
    assert kohya[f"{linear1}.alpha"].item() == pytest.approx(4 * ALPHA)
    assert kohya["lora_unet_double_blocks_0_img_mlp_0.alpha"].item() == pytest.approx(ALPHA)
    assert kohya["lora_unet_single_blocks_1_linear2.lora_down.weight"].shape == (RANK, 5 * WIDTH)  # attention + MLP
    assert comfy["diffusion_model.single_blocks.1.linear1.alpha"].item() == pytest.approx(4 * ALPHA)
    # diffusers' kohya converter applies no alpha to final_layer: its scale is in lora_down and alpha = rank
    assert kohya["lora_unet_final_layer_linear.alpha"].item() == RANK
    torch.testing.assert_close(kohya["lora_unet_final_layer_linear.lora_down.weight"],
                               tensors["proj_out.lora_A.weight"] * (ALPHA / RANK))


@pytest.mark.parametrize(("family", "targets"), [
    ("flux2", "all"), ("flux2", "tiny"), ("flux2", "mlp"),
    ("flux1", "all"), ("flux1", "tiny"), ("flux1", "attention"), ("flux1", "mlp"), ("flux1", "all+ffs"),
])
def test_bfl_round_trip_keeps_every_delta_w(transformers: dict, family: str, targets: str) -> None:
    tensors = _exported(transformers, family, targets)
    want = _delta(tensors, ALPHA / RANK)
    back = lf.from_comfyui(family, lf.to_comfyui(family, tensors, ALPHA, RANK))
    _assert_same_delta(_delta(back, 1.0), want)
    # our own fused layers are block-diagonal, so every module comes back at its own rank, zero padding dropped
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in tensors.items()}
    if family == "flux1":
        _assert_same_delta(_delta(lf.from_comfyui(family, lf.to_kohya(tensors, ALPHA, RANK)), 1.0), want)


def test_tiny_preset_pads_the_untargeted_k_with_zeros(transformers: dict) -> None:
    tensors = _exported(transformers, "flux2", "tiny")
    comfy = lf.to_comfyui("flux2", tensors, ALPHA, RANK)
    a = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    b = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    assert a.shape == (3 * RANK, WIDTH) and not a[RANK:2 * RANK].any() and not b[WIDTH:2 * WIDTH].any()
    assert not any("txt_attn" in k or "single_blocks" in k for k in comfy)


def test_fused_diffusers_names_and_foreign_shared_lora_a_files() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=generator), torch.randn(24, 5, generator=generator)
    ours = {"transformer_blocks.0.attn.to_qkv.lora_A.weight": a, "transformer_blocks.0.attn.to_qkv.lora_B.weight": b}
    comfy = lf.to_comfyui("flux2", ours, 2.0, 2)  # after fuse_qkv_projections: already the BFL layout
    assert comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"].shape == (24, 5)
    # A file from elsewhere: one lora_A shared by q, k, v (not block-diagonal), with an alpha.
    foreign = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": a,
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": b,
               "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(10.0)}
    back = lf.from_comfyui("flux2", foreign)
    fused = 2.0 * b.double() @ a.double()
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        part = back[f"transformer_blocks.0.attn.{name}.lora_B.weight"].double() @ \
            back[f"transformer_blocks.0.attn.{name}.lora_A.weight"].double()
        torch.testing.assert_close(part, fused[8 * i:8 * (i + 1)], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- refusals


def test_lokr_and_unsupported_formats_name_output_formats(transformers: dict) -> None:
    transformer = copy.deepcopy(transformers["flux2"])
    add_adapter(transformer, "flux2", type="lokr", rank=RANK, alpha=ALPHA, dropout=0.0, targets="tiny",
                init="default")
    tensors, _ = adapter_export(transformer)
    with pytest.raises(UserError, match="output.formats"):
        lf.to_comfyui("flux2", tensors, ALPHA, RANK)
    with pytest.raises(ValueError, match="kohya layout is FLUX.1's"):
        lf.to_kohya(_exported(transformers, "flux2", "tiny"), ALPHA, RANK, family="flux2")


def test_modulation_targets_cannot_be_written_in_bfl_layouts(transformers: dict) -> None:
    tensors = _exported(transformers, "flux1", r"transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q)")
    with pytest.raises(UserError, match="output.formats.*modulation"):
        lf.to_comfyui("flux1", tensors, ALPHA, RANK)


# ---------------------------------------------------------------------------------------------- files


def test_metadata_is_written_and_parseable(tmp_path: Path) -> None:
    when = datetime(2025, 5, 1, 12, 30, tzinfo=UTC)
    meta = lf.build_metadata(family="flux1", flavour="dev", rank=16, alpha=8.0, steps=1500,
                             trigger_words=["shapez", "", "ohwx dog"], base_model="black-forest-labs/FLUX.1-dev",
                             spec_toml=SPEC_TOML, format="kohya", resolution=1024, created=when)
    path = tmp_path / "x.safetensors"
    lf.write_lora(path, {"lora_unet_img_in.lora_down.weight": torch.zeros(2, 3)}, meta)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header == meta and all(isinstance(v, str) for v in header.values())
    assert int(header["ss_network_dim"]) == 16 and float(header["ss_network_alpha"]) == 8.0
    assert int(header["ss_steps"]) == 1500 and json.loads(header["training_info"]) == {"step": 1500}
    assert header["modelspec.architecture"] == "flux-1-dev/lora"
    assert header["modelspec.trigger_phrase"] == "shapez, ohwx dog"
    assert header["modelspec.resolution"] == "1024x1024"
    assert datetime.fromisoformat(header["modelspec.date"]) == when
    assert header["ss_base_model_version"] == "flux1" and header["ss_network_module"] == "networks.lora_flux"
    assert header["flux_lora_studio.lora_format"] == "kohya"
    assert tomllib.loads(header["flux_lora_studio.spec"])["output"]["name"] == "shapes"
    flux2 = lf.build_metadata(family="flux2", flavour="klein-base-9b", rank=4, alpha=4, steps=1, trigger_words=[],
                              base_model="b", spec_toml="", format="diffusers")
    assert flux2["modelspec.architecture"] == "flux-2-klein-base-9b/lora"
    assert flux2["modelspec.implementation"] == "diffusers" and "modelspec.trigger_phrase" not in flux2
    assert not [p for p in tmp_path.iterdir() if p.name != "x.safetensors"], "a temporary file was left behind"


def test_merge_metadata_keeps_the_diffusers_adapter_config(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    lf.write_lora(path, {"transformer.x.lora_A.weight": torch.ones(1, 2)},
                  {"format": "pt", "lora_adapter_metadata": '{"transformer.r": 1}'})
    lf.merge_metadata(path, {"ss_steps": "7"})
    tensors, header = lf.read_lora(path)
    assert header == {"format": "pt", "lora_adapter_metadata": '{"transformer.r": 1}', "ss_steps": "7"}
    torch.testing.assert_close(tensors["transformer.x.lora_A.weight"], torch.ones(1, 2))
    with pytest.raises(TypeError):
        lf.write_lora(path, {}, {"ss_steps": 7})  # type: ignore[dict-item]


def test_file_names_per_format() -> None:
    assert lf.lora_filename("shapes", "diffusers") == "shapes.safetensors"
    assert lf.lora_filename("shapes", "comfyui") == "shapes_comfyui.safetensors"
    assert lf.lora_filename("shapes", "kohya", step=250) == "shapes-step000250_kohya.safetensors"


def test_copy_to_comfy_loras(tmp_path: Path) -> None:
    source = tmp_path / "shapes_comfyui.safetensors"
    lf.write_lora(source, {"diffusion_model.img_in.lora_A.weight": torch.ones(2, 2)}, {"format": "pt"})
    with pytest.raises(UserError, match="output.comfy_lora_dir.*does not exist"):
        lf.copy_to_comfy_loras(source, tmp_path / "ComfyUI" / "models" / "loras")
    assert not (tmp_path / "ComfyUI").exists(), "a missing folder must not be created"
    with pytest.raises(UserError, match="output.comfy_lora_dir.*not a folder"):
        lf.copy_to_comfy_loras(source, source)
    loras = tmp_path / "loras"
    loras.mkdir()
    copied = lf.copy_to_comfy_loras(source, loras)
    assert copied == loras / source.name and copied.read_bytes() == source.read_bytes()
    assert [p.name for p in loras.iterdir()] == [source.name]
    if os.geteuid() != 0:  # root writes anywhere
        loras.chmod(0o500)
        try:
            with pytest.raises(UserError, match="output.comfy_lora_dir.*not writable"):
                lf.copy_to_comfy_loras(source, loras)
        finally:
            loras.chmod(0o700)
