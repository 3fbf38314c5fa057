"""Model sources: single files as ComfyUI keeps them, recognition and wrong-slot refusals, fp8 files, the hub.

The demo's components are written as single files with our own converters (BFL transformer with and without
`model.diffusion_model.`, ldm VAE, text encoders as ComfyUI stores them) and must load to the same outputs as
the demo folder. Real-size files are faked by their headers alone (sparse files: no bytes written), which is all
recognition reads. huggingface_hub's own client talks to a Hub in memory (tests/fake_hub.py): no network.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from bfl_layout import bfl_to_diffusers, diffusers_to_bfl
from safetensors.torch import save_file

from tests.fake_hub import FakeHub, serving
from tests.flavour_models import header_only_file, meta_shapes
from trainer import registry
from trainer.errors import UserError
from trainer.events import DownloadProgress, Event
from trainer.families import family_ops
from trainer.sources import ModelFiles, model_files, resolve_model_paths
from trainer.sources.recognise import check_file, recognise
from trainer.sources.transformer_keys import BFL_PREFIX, bfl_shapes, transformer_plan
from trainer.sources.vae_keys import vae_diffusers_to_ldm, vae_ldm_to_diffusers

FLAVOUR = {family: registry.get_flavour(family, "demo") for family in ("flux2", "flux1")}
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def _flux_transformer_shapes(family: str, flavour: str) -> dict[str, tuple[int, ...]]:
    """The BFL tensor shapes of a real flavour's transformer, from its diffusers class on the meta device."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    f = registry.get_flavour(family, flavour)
    common = dict(num_layers=f.double_blocks, num_single_layers=f.single_blocks, attention_head_dim=f.head_dim,
                  num_attention_heads=f.num_heads, joint_attention_dim=f.joint_attention_dim,
                  guidance_embeds=f.guidance == "embedded")
    model_class = Flux2Transformer2DModel if family == "flux2" else FluxTransformer2DModel
    shapes = meta_shapes(model_class, **common)
    return bfl_shapes(transformer_plan(family, shapes), shapes)


def _text_encoder_shapes(kind: str, width: int = 0) -> dict[str, tuple[int, ...]]:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        MistralConfig,
        MistralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        T5Config,
        T5EncoderModel,
    )

    if kind == "qwen3":
        config = Qwen3Config(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=1024)
        return meta_shapes(Qwen3ForCausalLM, config)
    if kind == "mistral":
        config = MistralConfig(hidden_size=5120, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=1024)
        return meta_shapes(MistralForCausalLM, config)
    if kind == "t5":
        config = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                          feed_forward_proj="gated-gelu", vocab_size=1024)
        return {k: v for k, v in meta_shapes(T5EncoderModel, config).items() if "embed_tokens" not in k}
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    return meta_shapes(CLIPTextModel, config)


# ---------------------------------------------------------------------------------------------- demo files


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}


def _write_demo_files(pipe: object, family: str, out: Path) -> dict[str, Path]:
    """The demo pipeline's components as single files, laid out like ComfyUI's models/ folder."""
    paths = {
        "transformer": out / "diffusion_models" / f"{family}_transformer.safetensors",
        "transformer_bare": out / "unet" / f"{family}_transformer_bare.safetensors",
        "vae": out / "vae" / f"{family}_ae.safetensors",
        "text_encoder": out / "text_encoders" / f"{family}_te.safetensors",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    transformer = _state(pipe.transformer)
    save_file(diffusers_to_bfl(transformer, family, BFL_PREFIX), paths["transformer"])
    save_file(diffusers_to_bfl(transformer, family), paths["transformer_bare"])
    save_file(vae_diffusers_to_ldm(_state(pipe.vae), family), paths["vae"])
    text = _state(pipe.text_encoder)
    if family != "flux2":  # the Qwen3 state has no head (never loaded), as ComfyUI's Qwen3 files leave it out
        # ComfyUI's clip_l names the text model `text_model.` and carries the full CLIP's projection and logit
        # scale, which the text model lacks
        text = {f"text_model.{name}": tensor for name, tensor in text.items()}
        text["text_projection.weight"] = torch.zeros(4, 4)
        text["logit_scale"] = torch.tensor(4.6)
        t5 = _state(pipe.text_encoder_2)
        t5.pop("encoder.embed_tokens.weight")  # tied to shared.weight, stored once
        paths["text_encoder_2"] = out / "clip" / "t5_tiny.safetensors"
        paths["text_encoder_2"].parent.mkdir(parents=True, exist_ok=True)
        save_file(t5, paths["text_encoder_2"])
    save_file(text, paths["text_encoder"])
    # ComfyUI's all-in-one checkpoint: every component under its own prefix in one file
    paths["checkpoint"] = out / "checkpoints" / f"{family}_all_in_one.safetensors"
    paths["checkpoint"].parent.mkdir(parents=True, exist_ok=True)
    encoder = "text_encoders.qwen3_4b.transformer." if family == "flux2" else "text_encoders.clip_l.transformer."
    everything = {**diffusers_to_bfl(transformer, family, BFL_PREFIX),
                  **{f"first_stage_model.{k}": v for k, v in vae_diffusers_to_ldm(_state(pipe.vae), family).items()},
                  **{encoder + k: v for k, v in text.items() if not k.startswith(("text_projection", "logit"))}}
    if family == "flux1":
        everything.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()})
    save_file(everything, paths["checkpoint"])
    return paths


@pytest.fixture(scope="module")
def demo_files(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("comfy") / "models"
    result = {}
    for family in ("flux2", "flux1"):
        pipe = family_ops(family).load_pipeline(str(demo_dir / family), FLAVOUR[family], torch.float32)
        result[family] = _write_demo_files(pipe, family, out)
    return result


def _outputs(pipe: object, family: str) -> dict[str, torch.Tensor]:
    """Transformer prediction, VAE latents and prompt embeddings for fixed inputs."""
    ops, flavour = family_ops(family), FLAVOUR[family]
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    text = ops.encode_prompts(pipe, ["a red circle on a blue background"], flavour)
    latents = ops.encode_images(pipe, pixels)
    noisy = torch.randn(latents.shape, generator=generator)
    guidance = torch.tensor([3.5]) if family == "flux1" else None
    with torch.no_grad():
        prediction = ops.predict(pipe.transformer, noisy, torch.tensor([0.6]), text, guidance)
    return {"latents": latents, "prediction": prediction, **text}


# ---------------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("family", ["flux2", "flux1"])
def test_transformer_and_vae_layouts_round_trip_exactly(demo_dir: Path, family: str) -> None:
    pipe = family_ops(family).load_pipeline(str(demo_dir / family), FLAVOUR[family], torch.float32,
                                            skip=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    state = _state(pipe.transformer)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    back = bfl_to_diffusers(diffusers_to_bfl(state, family), family, shapes)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    vae = _state(pipe.vae)
    back = vae_ldm_to_diffusers(vae_diffusers_to_ldm(vae, family), dict(pipe.vae.config))
    assert back.keys() == vae.keys() and all(torch.equal(back[k], vae[k]) for k in vae)


@pytest.mark.parametrize("family", ["flux2", "flux1"])
def test_bfl_names_agree_with_diffusers_converter_at_real_widths(family: str) -> None:
    """diffusers' own BFL converters read what we write, at the real flavours' row widths (FLUX.1's hard-codes
    FLUX.1 [dev]'s): tensors two columns wide keep this cheap, since only rows are split or swapped."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    model_class = Flux2Transformer2DModel if family == "flux2" else FluxTransformer2DModel
    shapes = meta_shapes(model_class, num_layers=1, num_single_layers=1, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn((shape[0], 2) if len(shape) > 1 else shape, generator=generator)
             for name, shape in shapes.items()}
    convert = convert_flux2_transformer_checkpoint_to_diffusers if family == "flux2" else \
        convert_flux_transformer_checkpoint_to_diffusers
    theirs = convert(diffusers_to_bfl(state, family, BFL_PREFIX if family == "flux1" else ""))
    assert theirs.keys() == state.keys()
    assert all(torch.equal(theirs[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family,transformer", [("flux2", "transformer"), ("flux2", "transformer_bare"),
                                                ("flux2", "checkpoint"), ("flux1", "transformer"),
                                                ("flux1", "transformer_bare"), ("flux1", "checkpoint")])
def test_single_files_load_like_the_folder(demo_dir: Path, demo_files: dict, family: str, transformer: str) -> None:
    paths = demo_files[family]
    files = ModelFiles(transformer=str(paths[transformer]), vae=str(paths["vae"]),
                       text_encoder=str(paths["text_encoder"]), text_encoder_2=str(paths.get("text_encoder_2", "")))
    if transformer == "checkpoint":  # every component from the one all-in-one file
        files = ModelFiles(**{slot: str(paths["checkpoint"]) if value else "" for slot, value in vars(files).items()})
    ops = family_ops(family)
    folder = ops.load_pipeline(str(demo_dir / family), FLAVOUR[family], torch.float32)
    single = ops.load_pipeline(str(demo_dir / family), FLAVOUR[family], torch.float32, files=files)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if getattr(folder, name, None) is not None:
            assert type(getattr(single, name)) is type(getattr(folder, name))
            # diffusers leaves its weights in the file's memory map, at addresses CPU kernels may sum in another
            # order (last-bit differences); fresh copies are aligned like the streamed ones, so outputs are exact.
            for parameter in getattr(folder, name).parameters():
                parameter.data = parameter.data.clone()
    expected, got = _outputs(folder, family), _outputs(single, family)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_fp8_file_dequantises_or_stays_fp8(demo_dir: Path, tmp_path: Path) -> None:
    """An e4m3 file with per-tensor scales (ComfyUI's scaled fp8): dequantised to the compute dtype, kept as is
    with base_precision fp8 (same outputs, the stored bytes untouched), and re-quantised to nf4."""
    from trainer.memory.quantize import QuantizedLinear

    ops, flavour = family_ops("flux2"), FLAVOUR["flux2"]
    folder = ops.load_pipeline(str(demo_dir / "flux2"), flavour, torch.float32)
    bfl = diffusers_to_bfl(_state(folder.transformer), "flux2", BFL_PREFIX)
    fp8, dequantised = {}, {}
    for key, tensor in bfl.items():
        if tensor.ndim == 2 and ("blocks." in key):
            scale = tensor.abs().max() / 448
            fp8[key] = (tensor / scale).to(torch.float8_e4m3fn)
            fp8[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            dequantised[key] = fp8[key].float() * scale
        else:
            fp8[key] = dequantised[key] = tensor
    fp8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(fp8, tmp_path / "fp8.safetensors")
    save_file(dequantised, tmp_path / "dequantised.safetensors")
    found = recognise(tmp_path / "fp8.safetensors")
    assert (found.fp8, found.scaled, found.flavours) == ("e4m3", True, ("demo",))

    def transformer(name: str, precision: str) -> torch.nn.Module:
        files = ModelFiles(transformer=str(tmp_path / name))
        return ops.load_pipeline(str(demo_dir / "flux2"), flavour, torch.float32, skip=("vae",),
                                 base_precision=precision, files=files).transformer

    text = ops.encode_prompts(folder, ["a red circle"], flavour)
    noisy = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(1))

    def predict(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return ops.predict(model, noisy, torch.tensor([0.5]), text, None)

    reference = transformer("dequantised.safetensors", "fp32")
    plain = transformer("fp8.safetensors", "fp32")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), plain.state_dict().values(),
                                                  strict=True))
    kept = transformer("fp8.safetensors", "fp8")
    layer = kept.transformer_blocks[0].attn.to_q
    assert isinstance(layer, QuantizedLinear) and layer.qweight.dtype == torch.float8_e4m3fn
    qkv = fp8[BFL_PREFIX + "double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(layer.qweight.view(torch.uint8), qkv[: layer.out_features].view(torch.uint8))
    torch.testing.assert_close(predict(kept), predict(reference), rtol=1e-5, atol=1e-6)
    nf4 = transformer("fp8.safetensors", "nf4")
    assert nf4.transformer_blocks[0].attn.to_q.format == "nf4" and predict(nf4).isfinite().all()


def test_pruned_decoder_file_needs_the_layers_read(demo_dir: Path, demo_files: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(demo_files["flux2"]["text_encoder"])
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.2.")}, tmp_path / "short.safetensors")
    files = ModelFiles(text_encoder=str(tmp_path / "short.safetensors"))
    with pytest.raises(UserError, match=r"model.text_encoder: 'short.safetensors' has 2 layers; this model reads "
                                        r"hidden state 3, so it needs at least 3"):
        family_ops("flux2").load_pipeline(str(demo_dir / "flux2"), FLAVOUR["flux2"], torch.float32, files=files)


# ---------------------------------------------------------------------------------------------- recognition


def _vae_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """A real FLUX VAE's tensors in BFL's ldm names (diffusers' default block widths, as BFL's)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    with init_empty_weights():
        model = AutoencoderKLFlux2() if family == "flux2" else AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            use_quant_conv=False, use_post_quant_conv=False)
    return {k: tuple(v.shape) for k, v in vae_diffusers_to_ldm(model.state_dict(), family).items()}


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-size files as users have them, header only (sparse), in a ComfyUI install's models/ folder."""
    from diffusers import FluxTransformer2DModel

    models = tmp_path_factory.mktemp("ComfyUI") / "models"
    prefixed = {k: v for k, v in ((BFL_PREFIX + k, v) for k, v in
                                  _flux_transformer_shapes("flux2", "klein-base-4b").items())}
    schnell = meta_shapes(FluxTransformer2DModel, num_layers=19, num_single_layers=38, guidance_embeds=False)
    files = {
        "klein4b": header_only_file(models / "diffusion_models" / "flux-2-klein-base-4b.safetensors", prefixed),
        "klein9b": header_only_file(models / "diffusion_models" / "flux-2-klein-base-9b.safetensors",
                                _flux_transformer_shapes("flux2", "klein-base-9b")),
        "dev2": header_only_file(models / "diffusion_models" / "flux2_dev_fp8mixed.safetensors",
                             _flux_transformer_shapes("flux2", "dev"), "F8_E4M3"),
        "dev1": header_only_file(models / "unet" / "flux1-dev.safetensors", _flux_transformer_shapes("flux1", "dev")),
        "schnell": header_only_file(models / "unet" / "schnell-diffusers.safetensors", schnell),  # diffusers layout
        "vae2": header_only_file(models / "vae" / "flux2-vae.safetensors", _vae_shapes("flux2")),
        "ae": header_only_file(models / "vae" / "ae.safetensors", _vae_shapes("flux1")),
        "qwen4b": header_only_file(models / "text_encoders" / "qwen_3_4b.safetensors",
                                   _text_encoder_shapes("qwen3", 2560)),
        "qwen8b": header_only_file(models / "text_encoders" / "qwen_3_8b_fp8mixed.safetensors",
                               _text_encoder_shapes("qwen3", 4096), "F8_E4M3"),
        "mistral": header_only_file(models / "text_encoders" / "mistral_3_small_flux2_bf16.safetensors",
                                _text_encoder_shapes("mistral")),
        "clip": header_only_file(models / "clip" / "clip_l.safetensors",
                             {f"text_model.{k}": v for k, v in _text_encoder_shapes("clip").items()}),
        "t5": header_only_file(models / "clip" / "t5" / "t5xxl_fp8_e4m3fn.safetensors", _text_encoder_shapes("t5"),
                           "F8_E4M3"),
        "lora": header_only_file(models / "diffusion_models" / "not_a_model.safetensors", {"lora_A.weight": (4, 8)}),
        "aio": header_only_file(models / "checkpoints" / "flux1-dev-fp8.safetensors", {
            **{BFL_PREFIX + k: v for k, v in _flux_transformer_shapes("flux1", "dev").items()},
            **{f"first_stage_model.{k}": v for k, v in _vae_shapes("flux1").items()},
            **{f"text_encoders.clip_l.transformer.text_model.{k}": v for k, v in _text_encoder_shapes("clip").items()},
            **{f"text_encoders.t5xxl.transformer.{k}": v for k, v in _text_encoder_shapes("t5").items()}}),
        "sdxl": header_only_file(models / "checkpoints" / "sdxl.safetensors", {
            f"first_stage_model.{k}": v for k, v in _vae_shapes("flux1").items()}),
    }
    garbage = models / "vae" / "broken.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    files["garbage"] = garbage
    return files


def test_recognises_each_kind_from_the_header(real_files: dict[str, Path], demo_files: dict) -> None:
    cases = {
        "klein4b": ("transformer", "flux2", ("klein-base-4b",), 3072),
        "klein9b": ("transformer", "flux2", ("klein-base-9b",), 4096),
        "dev2": ("transformer", "flux2", ("dev",), 6144),
        "dev1": ("transformer", "flux1", ("dev", "krea", "kontext"), 3072),
        "schnell": ("transformer", "flux1", ("schnell",), 3072),
        "vae2": ("vae", "flux2", (), 32),
        "ae": ("vae", "flux1", (), 16),
        "qwen4b": ("qwen3", "", (), 2560),
        "qwen8b": ("qwen3", "", (), 4096),
        "mistral": ("mistral", "", (), 5120),
        "clip": ("clip", "", (), 768),
        "t5": ("t5", "", (), 4096),
        "lora": ("unknown", "", (), 0),
    }
    for name, (kind, family, flavours, width) in cases.items():
        found = recognise(real_files[name])
        assert (found.kind, found.family, found.flavours, found.hidden_size) == (kind, family, flavours, width), name
    klein4b, dev2, schnell = (recognise(real_files[n]) for n in ("klein4b", "dev2", "schnell"))
    assert (klein4b.prefix, klein4b.layout, klein4b.double_blocks, klein4b.single_blocks) == (BFL_PREFIX, "bfl", 5, 20)
    assert dev2.label == ("FLUX.2 [dev] 32B transformer (bfl layout, fp8 e4m3) "
                          "[hidden 6144, 8 double + 48 single blocks]")
    assert (schnell.layout, schnell.guidance) == ("diffusers", False)
    assert recognise(real_files["qwen8b"]).label.startswith("Qwen3-8B text encoder (fp8 e4m3)")
    assert recognise(real_files["t5"]).label == "T5-XXL text encoder (fp8 e4m3) [24 blocks of 4096]"
    assert recognise(real_files["aio"]).flavours == ("dev", "krea", "kontext")  # all-in-one: the transformer first
    assert [recognise(real_files["aio"], kind).prefix for kind in ("vae", "clip", "t5")] == [
        "first_stage_model.", "text_encoders.clip_l.transformer.text_model.", "text_encoders.t5xxl.transformer."]
    demo = demo_files["flux2"]
    assert recognise(demo["transformer"]).flavours == ("demo",) and recognise(demo["vae"]).family == "flux2"
    assert recognise(demo_files["flux1"]["text_encoder"]).kind == "clip"
    assert recognise(demo_files["flux1"]["text_encoder_2"]).kind == "t5"


def test_wrong_slot_refusals_name_the_key_the_file_and_both_sides(real_files: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    klein4b, klein9b = registry.get_flavour("flux2", "klein-base-4b"), registry.get_flavour("flux2", "klein-base-9b")
    flux1_dev = registry.get_flavour("flux1", "dev")
    assert check_file("transformer", real_files["vae2"], klein4b) == (
        "model.transformer: 'flux2-vae.safetensors' is a VAE (FLUX.2 VAE (bfl layout) [32 latent channels]), not the "
        "FLUX.2 [klein] base 4B transformer; it belongs in model.vae")
    assert check_file("text_encoder", real_files["qwen4b"], klein9b) == (
        "model.text_encoder: 'qwen_3_4b.safetensors' is the Qwen3-4B text encoder [36 layers of 2560]; FLUX.2 "
        "[klein] base 9B needs Qwen3-8B text encoder (hidden 4096)")
    assert check_file("transformer", real_files["dev1"], klein9b) == (
        "model.transformer: 'flux1-dev.safetensors' is FLUX.1 [dev] / FLUX.1 Krea [dev] / FLUX.1 Kontext [dev]: 19 + "
        "38 blocks, width 3072, not FLUX.2 [klein] base 9B (model.family = flux2, model.flavour = klein-base-9b: 8 + "
        "24 blocks, width 4096); set model.family = flux1 and model.flavour = dev, krea or kontext")
    assert check_file("transformer", real_files["klein9b"], klein4b) == (
        "model.transformer: 'flux-2-klein-base-9b.safetensors' is FLUX.2 [klein] base 9B: 8 + 24 blocks, width 4096, "
        "not FLUX.2 [klein] base 4B (model.family = flux2, model.flavour = klein-base-4b: 5 + 20 blocks, width "
        "3072); choose model.flavour = klein-base-9b")
    assert check_file("vae", real_files["ae"], klein4b) == (
        "model.vae: 'ae.safetensors' is FLUX.1 VAE (bfl layout) [16 latent channels]; FLUX.2 [klein] base 4B needs "
        "the 32-channel FLUX.2 VAE (flux2-vae.safetensors)")
    assert check_file("text_encoder", real_files["t5"], flux1_dev) == (
        "model.text_encoder: 't5xxl_fp8_e4m3fn.safetensors' is a T5 text encoder (T5-XXL text encoder (fp8 e4m3) "
        "[24 blocks of 4096]), not CLIP-L (width 768); it belongs in model.text_encoder_2")
    assert check_file("transformer", real_files["lora"], klein4b).startswith(
        "model.transformer: 'not_a_model.safetensors' is not a FLUX component (1 tensor, e.g. lora_A.weight); "
        "expected the FLUX.2 [klein] base 4B transformer")
    assert check_file("vae", real_files["garbage"], klein4b).startswith(
        f"model.vae: '{real_files['garbage']}' is not a readable safetensors file (")
    assert check_file("vae", tmp_path / "nope.safetensors", klein4b) == (
        f"model.vae: file '{tmp_path / 'nope.safetensors'}' does not exist")
    for name, slot, flavour in (("klein4b", "transformer", klein4b), ("qwen8b", "text_encoder", klein9b),
                                ("mistral", "text_encoder", registry.get_flavour("flux2", "dev")),
                                ("dev1", "transformer", registry.get_flavour("flux1", "kontext")),
                                ("clip", "text_encoder", flux1_dev), ("t5", "text_encoder_2", flux1_dev)):
        assert check_file(slot, real_files[name], flavour) is None, name


def test_preflight_and_load_refuse_with_one_line_per_key(demo_dir: Path, demo_files: dict,
                                                         real_files: dict[str, Path], tmp_path: Path) -> None:
    from trainer.preflight import check_files
    from trainer.spec import SpecError, load_spec, parse_spec, resolve_paths

    spec = resolve_paths(load_spec(demo_dir / "job.toml"), demo_dir)
    data = spec.to_dict()
    data["model"].update(transformer=str(demo_files["flux2"]["vae"]), vae=str(tmp_path / "missing.safetensors"),
                         text_encoder=str(real_files["qwen4b"]), comfy_models_dir=str(tmp_path / "no_comfy"))
    problems = [p for p in check_files(parse_spec(data)) if p.startswith("model.")]
    assert problems == [
        f"model.comfy_models_dir: folder '{tmp_path / 'no_comfy'}' does not exist; give ComfyUI's models folder or "
        "leave it empty",
        "model.transformer: 'flux2_ae.safetensors' is a VAE (FLUX.2 VAE (bfl layout) [32 latent channels]), not the "
        "FLUX.2 demo (tiny, random weights) transformer; it belongs in model.vae",
        f"model.vae: file '{tmp_path / 'missing.safetensors'}' does not exist",
        "model.text_encoder: 'qwen_3_4b.safetensors' is the Qwen3-4B text encoder [36 layers of 2560]; FLUX.2 demo "
        "(tiny, random weights) needs a Qwen3 text encoder (hidden 16)",
    ]
    files = ModelFiles(transformer=str(demo_files["flux1"]["transformer"]))
    with pytest.raises(UserError, match=r"^model.transformer: 'flux1_transformer.safetensors' is FLUX.1 demo"):
        family_ops("flux2").load_pipeline(str(demo_dir / "flux2"), FLAVOUR["flux2"], torch.float32, files=files)
    data["model"].update(family="flux2", text_encoder_2="t5.safetensors")
    with pytest.raises(SpecError, match="model.text_encoder_2: FLUX.2 has one text encoder"):
        parse_spec(data)


@pytest.mark.parametrize(("family", "flavour", "folder", "expected"), [
    ("flux2", "demo", "flux1", "{source}/transformer/config.json' is FLUX.1 demo (tiny, random weights): 2 + 2 blocks, "
                               "width 128, not FLUX.2 demo (tiny, random weights) (model.family = flux2, model.flavour "
                               "= demo: 2 + 2 blocks, width 128); set model.family = flux1 and model.flavour = demo"),
    ("flux1", "demo", "kontext", "{source}' holds a FluxKontextPipeline (its model_index.json), but flux1 demo needs a "
                                 "FluxPipeline; set model.family flux1 with model.flavour kontext, or point "
                                 "model.source at a FLUX.1 demo (tiny, random weights) folder"),
    ("flux2", "dev", "flux2", "{source}/transformer/config.json' is FLUX.2 demo (tiny, random weights): 2 + 2 blocks, "
                              "width 128, not FLUX.2 [dev] 32B (model.family = flux2, model.flavour = dev: 8 + 48 "
                              "blocks, width 6144); choose model.flavour = demo"),
], ids=["flux1-folder-as-flux2", "kontext-folder-as-dev", "demo-folder-as-dev"])
def test_a_folder_of_another_pipeline_is_refused_before_loading(demo_dir: Path, tmp_path: Path, family: str,
                                                                flavour: str, folder: str, expected: str) -> None:
    """diffusers would load a FLUX.1 folder into Flux2KleinPipeline, or FLUX.1 [dev] as Kontext, without a word; the
    architecture is told first (it names the flavour to choose), then the pipeline class."""
    from tests.flavour_models import as_kontext_folder
    from trainer.preflight import check_files
    from trainer.spec import load_spec, resolve_paths

    source = as_kontext_folder(demo_dir / "flux1", tmp_path / "kontext") if folder == "kontext" else demo_dir / folder
    line = f"model.source: '{expected.format(source=source)}"
    with pytest.raises(UserError) as caught:
        family_ops(family).load_pipeline(str(source), registry.get_flavour(family, flavour), torch.float32)
    assert str(caught.value) == line
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [f"model.family='{family}'", f"model.flavour='{flavour}'",
                                                           f"model.source='{source}'"]), demo_dir)
    assert [p for p in check_files(spec) if p.startswith("model.")] == [line]  # the same line


def test_comfy_models_lists_candidates_per_slot(real_files: dict[str, Path]) -> None:
    from trainer.comfy_models import list_candidates

    install = real_files["klein4b"].parents[2]  # ComfyUI's install folder: models/ is found inside
    choices = list_candidates(install, "flux2", "klein-base-4b")
    names = {slot: [(c.name, c.fits) for c in found] for slot, found in choices.items()}
    assert names["transformer"] == [
        ("flux-2-klein-base-4b.safetensors", True), ("flux-2-klein-base-9b.safetensors", False),
        ("flux1-dev-fp8.safetensors", False), ("flux1-dev.safetensors", False),
        ("flux2_dev_fp8mixed.safetensors", False), ("schnell-diffusers.safetensors", False)]
    assert names["vae"] == [("flux2-vae.safetensors", True), ("ae.safetensors", False),
                            ("flux1-dev-fp8.safetensors", False)]  # not the SDXL checkpoint's VAE
    assert names["text_encoder"] == [("qwen_3_4b.safetensors", True), ("qwen_3_8b_fp8mixed.safetensors", False)]
    assert names["text_encoder_2"] == []
    nine = choices["transformer"][1]
    assert nine.path == str(real_files["klein9b"].resolve()) and "choose model.flavour = klein-base-9b" in nine.why
    flux1 = list_candidates(install / "models", "flux1", "dev")
    assert [(c.folder, c.name) for c in flux1["text_encoder"]] == [
        ("clip", "clip_l.safetensors"), ("checkpoints", "flux1-dev-fp8.safetensors")]
    assert [c.name for c in flux1["text_encoder_2"]] == ["flux1-dev-fp8.safetensors", "t5/t5xxl_fp8_e4m3fn.safetensors"]
    assert [c.name for c in flux1["transformer"] if c.fits] == ["flux1-dev-fp8.safetensors", "flux1-dev.safetensors"]
    assert all(c.fits for slot in ("vae", "text_encoder", "text_encoder_2") for c in flux1[slot]
               if c.folder == "checkpoints")
    assert list_candidates("", "flux1", "dev") == {slot: [] for slot in names}


def test_bare_names_are_found_in_the_comfy_folder(real_files: dict[str, Path], tmp_path: Path) -> None:
    from trainer.spec import ModelSection

    models = real_files["klein4b"].parents[1]
    section = ModelSection(family="flux2", flavour="klein-base-4b", comfy_models_dir=str(models),
                           transformer="flux-2-klein-base-4b.safetensors", vae="flux2-vae.safetensors",
                           text_encoder="elsewhere.safetensors")
    files = model_files(section)
    assert files.transformer == str(models / "diffusion_models" / "flux-2-klein-base-4b.safetensors")
    assert files.vae == str(models / "vae" / "flux2-vae.safetensors")
    assert files.text_encoder == "elsewhere.safetensors"  # not found: left for the preflight line
    local = tmp_path / "mine.safetensors"
    local.write_bytes(b"")
    resolved = resolve_model_paths({"comfy_models_dir": "models", "transformer": "mine.safetensors",
                                    "vae": "flux2-vae.safetensors"}, tmp_path)
    assert resolved == {"comfy_models_dir": str(tmp_path / "models"), "transformer": str(local),
                        "vae": "flux2-vae.safetensors"}


def test_mistral_file_without_image_tower_and_pruned(tmp_path: Path) -> None:
    """ComfyUI's Mistral for FLUX.2 [dev] is the language model alone (`model.layers...`), cut after the last
    layer FLUX.2 reads: it loads into Mistral3ForConditionalGeneration with the same hidden states."""
    from transformers import Mistral3Config, MistralConfig, MistralForCausalLM, PixtralVisionConfig

    from trainer.sources.single_file import load_text_encoder_file

    text = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=16)
    Mistral3Config(text_config=text, vision_config=vision).save_pretrained(tmp_path / "text_encoder")
    torch.manual_seed(0)
    reference = MistralForCausalLM(text).eval()
    state = {k: v for k, v in _state(reference).items() if not k.startswith("model.layers.3.")}
    save_file(state, tmp_path / "mistral_pruned.safetensors")
    found = recognise(tmp_path / "mistral_pruned.safetensors")
    assert (found.kind, found.layers) == ("mistral", 3)
    model = load_text_encoder_file(tmp_path / "mistral_pruned.safetensors", found, tmp_path / "text_encoder",
                                   "Mistral3ForConditionalGeneration", torch.float32, hidden_layers=(1, 2))
    assert model.model.vision_tower is None
    assert not any("lm_head" in name for name in model.state_dict())  # its untied head is in the file, unread
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        theirs = reference(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer in (1, 2):
        torch.testing.assert_close(ours[layer], theirs[layer], rtol=0, atol=1e-6)


def test_a_decoder_loads_without_its_head_and_embeds_as_transformers_does(demo_dir: Path) -> None:
    """The prompt embedding is hidden states: the language-model head is never loaded, and what remains gives the
    hidden states transformers' own loading gives."""
    from transformers import Qwen3ForCausalLM

    from trainer.sources.single_file import NoLogits

    pipe = family_ops("flux2").load_pipeline(str(demo_dir / "flux2"), FLAVOUR["flux2"], torch.float32,
                                             skip=("transformer", "vae"))
    ours = pipe.text_encoder
    assert isinstance(ours.lm_head, NoLogits) and not any("lm_head" in name for name in ours.state_dict())
    theirs = Qwen3ForCausalLM.from_pretrained(demo_dir / "flux2" / "text_encoder", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(input_ids=ids, output_hidden_states=True, use_cache=False)
        want = theirs(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert got.logits.shape == (2, 7, 0)  # no logits computed
    for mine, reference in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


def test_a_decoder_keeps_only_the_layers_up_to_the_deepest_hidden_state_read(demo_dir: Path) -> None:
    """Layers past the deepest hidden state the pipeline stacks are neither loaded nor run (klein reads 27 of
    Qwen3's 36, FLUX.2 dev 30 of Mistral's 40); the states it reads are transformers' own, exactly."""
    from transformers import Qwen3ForCausalLM

    from trainer.sources.reader import FileReader
    from trainer.sources.recognise import Recognised
    from trainer.sources.single_file import fill_text_encoder

    folder = demo_dir / "flux2" / "text_encoder"
    readers = [FileReader(path, "", "model.text_encoder") for path in sorted(folder.glob("*.safetensors"))]
    ours = fill_text_encoder(readers, Recognised("qwen3", "Qwen3ForCausalLM", layout="hf"), folder,
                             "Qwen3ForCausalLM", torch.float32, hidden_layers=(1,))
    theirs = Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert len(theirs.model.layers) == 3 and len(ours.model.layers) == 2 and ours.config.num_hidden_layers == 2
    ids = torch.randint(0, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        want = theirs(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for index in (0, 1):  # what a pipeline reading hidden state 1 stacks
        torch.testing.assert_close(got[index], want[index], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- the hub


KLEIN = registry.get_flavour("flux2", "klein-base-4b")


@pytest.mark.parametrize("kind,token,expected", [
    ("offline", None, r"model.source: cannot download 'black-forest-labs/FLUX.2-klein-base-4B': HF_HUB_OFFLINE is "
                      r"set, and the files this job needs are not all in the Hugging Face cache. Connect to the "
                      r"internet \(and unset HF_HUB_OFFLINE\) to download them once, or point model.source at a "
                      r"local diffusers folder that holds the model."),
    ("down", None, r"model.source: cannot download 'black-forest-labs/FLUX.2-klein-base-4B': the Hugging Face Hub "
                   r"cannot be reached \(no network\?\), and the files this job needs are not all in the Hugging "
                   r"Face cache. Connect to the internet"),
    ("gated", "hf_secret_value", r"model.source: 'black-forest-labs/FLUX.2-klein-base-4B' is a gated model and the "
                                 r"token in use \(HF_TOKEN or the saved login\) has no access to it yet. Accept its "
                                 r"licence on https://huggingface.co/black-forest-labs/FLUX.2-klein-base-4B "
                                 r"\(logged in to Hugging Face\), then log in here with `hf auth login` \(or "
                                 r"`huggingface-cli login`\) or set HF_TOKEN"),
    ("gated", None, r"is a gated model and no Hugging Face token is set on this machine. Accept its licence"),
    ("missing", None, r"model.source: no Hugging Face repo 'black-forest-labs/FLUX.2-klein-base-4B' is visible \(no "
                      r"Hugging Face token is set on this machine\)"),
    ("unauthorised", "hf_secret_value", r"model.source: Hugging Face refused 'black-forest-labs/FLUX.2-klein-base-4B' "
                                        r"\(401: the token in use \(HF_TOKEN or the saved login\) is not valid\). "
                                        r"Log in with `hf auth "
                                        r"login` or set HF_TOKEN to a valid read token"),
], ids=["offline", "down", "gated-with-token", "gated-no-token", "missing", "invalid-token"])
def test_hub_failures_become_one_clear_message(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               kind: str, token: str | None, expected: str) -> None:
    """huggingface_hub's own snapshot_download against a Hub that answers as it does for each failure."""
    import huggingface_hub
    from huggingface_hub import constants

    hub = FakeHub(KLEIN.hub_id, demo_dir / "flux2", refuse="" if kind == "offline" else kind)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if kind == "offline" else "0")
    with serving(hub, tmp_path / "cache"), pytest.raises(UserError, match=expected) as caught:
        constants.HF_HUB_OFFLINE = kind == "offline"
        family_ops("flux2").load_pipeline(KLEIN.hub_id, KLEIN, torch.bfloat16)
    assert "hf_secret_value" not in str(caught.value)
    assert (hub.requests == []) == (kind == "offline")


def test_hub_download_fetches_only_what_is_needed_reports_progress_and_resumes(
        demo_dir: Path, demo_files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's own snapshot_download: only the files the job needs, progress as events, and after a
    connection lost mid-way the next run fetches only the files the first did not finish."""
    hub = FakeHub("acme/flux2-demo", demo_dir / "flux2", drop={"text_encoder/model.safetensors"})
    files = ModelFiles(transformer=str(demo_files["flux2"]["transformer"]))
    events: list[Event] = []
    with serving(hub, tmp_path / "cache"):
        with pytest.raises(UserError, match=r"model.source: downloading 'acme/flux2-demo' failed \(ReadError: "
                                            r"connection reset by peer\); check the network and run again \(finished "
                                            r"files are kept\)"):
            family_ops("flux2").load_pipeline("acme/flux2-demo", FLAVOUR["flux2"], torch.float32, files=files)
        first = hub.downloads()
        hub.drop.clear()
        hub.requests.clear()
        pipe = family_ops("flux2").load_pipeline("acme/flux2-demo", FLAVOUR["flux2"], torch.float32, files=files,
                                                 emit=events.append)
    needed = [name for name in hub.files() if not name.startswith("transformer/") or name.endswith("config.json")]
    lost, second = "text_encoder/model.safetensors", hub.downloads()
    # The transformer's weights come from the single file, never downloaded. The first run's parallel downloads
    # may or may not have reached every file before the lost one failed it; the second fetches only the rest.
    assert lost in first and set(first) | set(second) == set(needed), (first, second)
    assert lost in second and not set(second) & (set(first) - {lost}), (first, second)
    assert pipe.transformer.config._name_or_path == str(demo_files["flux2"]["transformer"])
    progress = [e for e in events if isinstance(e, DownloadProgress)]
    sizes = {name: (demo_dir / "flux2" / name).stat().st_size for name in second}
    last = progress[-1]
    assert last.repo_id == "acme/flux2-demo" and last.downloaded_bytes == last.total_bytes  # what this run fetched
    assert sizes[lost] <= last.total_bytes <= sum(sizes.values())
    assert (last.files_done, last.files_total) == (len(needed), len(needed))  # the cached ones count as done
    assert [e.phase for e in events if hasattr(e, "phase")] == ["downloading"]
    assert len(progress) < 10  # throttled


def test_a_job_with_single_files_trains_from_them(demo_dir: Path, demo_files: dict, tmp_path: Path) -> None:
    """The session passes the job's single files to the loader: a BFL transformer file given by its bare name in the
    ComfyUI folder is what trains, and the latent cache is keyed by the VAE file it was made with."""
    from safetensors.torch import load_file

    from trainer.preflight import model_identity
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    files = demo_files["flux2"]
    comfy = tmp_path / "models"
    (comfy / "diffusion_models").mkdir(parents=True)
    stored = load_file(files["transformer"])
    key = next(k for k in stored if k.endswith("img_in.weight"))
    stored[key] = stored[key] * 2  # a file that differs from the demo folder's transformer
    save_file(stored, comfy / "diffusion_models" / "marked.safetensors")
    overrides = [f"output.dir='{tmp_path / 'out'}'", "train.max_steps=2", "sample.prompts=[]",
                 f"model.comfy_models_dir='{comfy}'", "model.transformer='marked.safetensors'",
                 f"model.vae='{files['vae']}'"]
    spec = resolve_paths(load_spec(demo_dir / "job.toml", overrides), demo_dir)
    session = Session(spec)
    try:
        session.setup()
        torch.testing.assert_close(session.transformer.x_embedder.weight.detach().float(), stored[key].float())
        session.train()
        assert len(session.losses) == 2
    finally:
        session.end()
    assert model_identity(spec, "vae").startswith(str(files["vae"]))
    assert model_identity(spec, "text_encoder") == str(demo_dir / "flux2")


# ---------------------------------------------------------------------------------------------- reading


_READ_UNDER_A_LIMIT = """
import resource, sys, torch
from safetensors import safe_open
from trainer.sources.reader import FileReader

size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
limit = size + 2 * 1024**3  # 2 GiB of address space more than now; the file is 8 GiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    with safe_open(sys.argv[1], framework="pt") as handle:
        handle.get_slice("big")[0:2]
    print("mapped")
except Exception:
    print("mapping refused")
rows = FileReader(sys.argv[1], "", "model.transformer").rows("big", 5, 7, torch.float32)
print(tuple(rows.shape), float(rows.abs().sum()))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux's RLIMIT_AS to stand for a machine with little RAM")
def test_a_file_larger_than_memory_reads_without_mapping_it(tmp_path: Path) -> None:
    """safetensors maps a file whole, and Linux refuses a private mapping larger than RAM + swap (the 33 GB FLUX.2
    dev fp8 file on a 24 GB machine). The reader reads the rows it needs: here two rows of an 8 GiB file under a
    2 GiB address-space limit, which safetensors' mapping cannot open."""
    import subprocess

    path = header_only_file(tmp_path / "big.safetensors", {"big": (1024 * 1024, 4096)})
    done = subprocess.run([sys.executable, "-c", _READ_UNDER_A_LIMIT, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["mapping refused", "(2, 4096) 0.0"]
