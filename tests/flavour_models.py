"""Tiny pipelines built from each real flavour's own classes, in memory, for tests/test_flavours.py.

The registry's demo flavours stand in for FLUX.2 klein and FLUX.1 dev; these add FLUX.2 dev (Flux2Pipeline with
Mistral3ForConditionalGeneration), klein base and FLUX.1 dev / krea / schnell / kontext, each with its pipeline
class, guidance embedding and scheduler configuration. Weights are random and widths tiny, but the text encoders
have their real depth (Mistral-Small-3.1: 40 layers, Qwen3-4B/8B: 36), so the flavours' own hidden-state layers
(10, 20, 30) and (9, 18, 27) are used unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch

from trainer.demo import _clip_tokenizer, _t5_tokenizer
from trainer.fabric.models import FLUX1_DEV_SCHEDULER, FLUX1_SCHNELL_SCHEDULER, FLUX2_SCHEDULER
from trainer.fabric.tokenizers import mistral_tokenizer, qwen3_tokenizer

SEED = 0
IMAGE_SIZE = 64
TEXT_HIDDEN = 16
JOINT_DIM = 3 * TEXT_HIDDEN  # FLUX.2 stacks three hidden-state layers
MISTRAL_LAYERS = 40  # Mistral-Small-3.1-24B
QWEN3_LAYERS = 36  # Qwen3-4B and Qwen3-8B
_VAE_CHANNELS = (8, 8, 8, 8)  # x8 downscale, as the demo

def _flux2_vae() -> Any:
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=_VAE_CHANNELS, layers_per_block=1, latent_channels=32,
                             norm_num_groups=4, sample_size=IMAGE_SIZE)
    with torch.no_grad():  # a trained VAE has non-trivial BatchNorm statistics of its latents
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.3, 2.0)
    return vae.eval()


def _flux2_transformer(guidance_embeds: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def flux2_dev_pipeline() -> Any:
    """Flux2Pipeline: Mistral3ForConditionalGeneration (40 text layers) and a guidance-embedding transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(SEED)
    tokenizer = mistral_tokenizer()
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
        text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32,
                                  num_hidden_layers=MISTRAL_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=8, max_position_embeddings=2048),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )).eval()
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=_flux2_vae(), text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=_flux2_transformer(guidance_embeds=True),
    )


def flux2_klein_base_pipeline() -> Any:
    """Flux2KleinPipeline (undistilled: real CFG): Qwen3ForCausalLM (36 layers), no guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    tokenizer = qwen3_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=QWEN3_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
        tie_word_embeddings=True,
    )).eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=_flux2_vae(), text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=_flux2_transformer(guidance_embeds=False), is_distilled=False,
    )


def flux1_pipeline(flavour: str) -> Any:
    """FluxPipeline (FluxKontextPipeline for kontext): CLIP-L-shaped pooled + T5 sequence, 16-channel VAE."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    hidden = 32
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=hidden, intermediate_size=64, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=hidden, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=hidden, pooled_projection_dim=hidden,
        guidance_embeds=flavour != "schnell", axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=_VAE_CHANNELS, layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    config = FLUX1_SCHNELL_SCHEDULER if flavour == "schnell" else FLUX1_DEV_SCHEDULER
    pipeline_class = diffusers.FluxKontextPipeline if flavour == "kontext" else diffusers.FluxPipeline
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**config), vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )


def tiny_flavour(family: str, name: str) -> Any:
    """The real flavour with the facts of its tiny model here (blocks, widths, text encoder): what the folder checks
    compare a folder of these models with. Everything else (classes, guidance, sampling) stays the flavour's."""
    from trainer.registry import get_flavour

    real = get_flavour(family, name)
    joint = JOINT_DIM if family == "flux2" else 32
    return dataclasses.replace(real, double_blocks=2, single_blocks=2, hidden_size=32, num_heads=2,
                               joint_attention_dim=joint, pooled_dim=32 if family == "flux1" else 0,
                               max_blocks_to_swap=2)


def demo_shaped_flavour(family: str, name: str) -> Any:
    """The real flavour with the demo's model facts (trainer/demo.py's pipelines are wider than the tiny ones here):
    the demo's weights under a real flavour's classes, guidance and sampling."""
    from trainer.registry import get_flavour

    demo = get_flavour(family, "demo")
    facts = ("double_blocks", "single_blocks", "hidden_size", "num_heads", "joint_attention_dim", "pooled_dim",
             "max_blocks_to_swap")
    return dataclasses.replace(get_flavour(family, name), **{fact: getattr(demo, fact) for fact in facts})


def pipeline_for(family: str, flavour: str) -> Any:
    """One shared tiny pipeline per kind (klein base 9B and 4B share one); tests that hook it must undo it."""
    return _build(family, "klein-base" if flavour.startswith("klein-base") else flavour)


@functools.cache
def _build(family: str, kind: str) -> Any:
    if family == "flux2":
        pipe = flux2_dev_pipeline() if kind == "dev" else flux2_klein_base_pipeline()
    else:
        pipe = flux1_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# model_index.json of the hub repo black-forest-labs/FLUX.2-dev: its tokenizer is a PixtralProcessor.
FLUX2_DEV_MODEL_INDEX = {
    "_class_name": "Flux2Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
    "tokenizer": ["transformers", "PixtralProcessor"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def save_flux2_dev_folder(out: Path) -> Path:
    """The tiny FLUX.2 dev pipeline in the hub repo's layout: model_index.json names a PixtralProcessor, and
    tokenizer/ is a saved processor (its tokenizer files and chat_template.jinja, processor_config.json, and an
    image processor config whose class wants torchvision); every config names the gated repo."""
    import json

    pipe = pipeline_for("flux2", "dev")
    pipe.save_pretrained(out, safe_serialization=True)
    index = {**FLUX2_DEV_MODEL_INDEX, "_diffusers_version": "0.36.0.dev0",
             "_name_or_path": "black-forest-labs/FLUX.2-dev"}
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    for config in out.glob("*/config.json"):
        data = json.loads(config.read_text(encoding="utf-8"))
        config.write_text(json.dumps({**data, "_name_or_path": "black-forest-labs/FLUX.2-dev"}), encoding="utf-8")
    tokenizer = out / "tokenizer"
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings.update(tokenizer_class="LlamaTokenizerFast", processor_class="PixtralProcessor")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    processor = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
                 "patch_size": 14, "processor_class": "PixtralProcessor", "spatial_merge_size": 2}
    (tokenizer / "processor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    image_processor = {"image_processor_type": "PixtralImageProcessorFast", "processor_class": "PixtralProcessor",
                       "patch_size": {"height": 14, "width": 14}, "size": {"longest_edge": 1540},
                       "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}
    (tokenizer / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2), encoding="utf-8")
    assert (tokenizer / "chat_template.jinja").is_file()  # transformers' tokenizer saves its template there
    return out


def as_kontext_folder(flux1_folder: Path, out: Path) -> Path:
    """The FLUX.1 demo folder as a Kontext one: its files linked, model_index.json naming FluxKontextPipeline (the
    same components; FLUX.1 Kontext [dev] differs from [dev] in its weights only)."""
    import json

    for path in flux1_folder.rglob("*"):
        if path.is_file():
            target = out / path.relative_to(flux1_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    index = json.loads((flux1_folder / "model_index.json").read_text(encoding="utf-8"))
    (out / "model_index.json").unlink()
    index["_class_name"] = "FluxKontextPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return out


def header_only_file(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """A valid safetensors file of the given tensors whose data is a hole (sparse): a real-size model's header."""
    size = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        count = size
        for n in shape:
            count *= n
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + count]}
        offset += count
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def meta_shapes(model_class: type, *args: object, **config: object) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a model built on the meta device (no memory, any size)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(*args, **config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
