"""The two layouts a fabricated model is written in: the hub's diffusers folder and ComfyUI's single files."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from trainer.fabric.models import Component, scheduler_config
from trainer.fabric.stream import TensorSpec, fp8_scale, shard, values, write_file
from trainer.registry import Flavour

SHARD_BYTES = 5 * 1000**3  # the hub's shard size
# ComfyUI's file names (its model folders' usual names for these releases)
COMFY_NAMES = {
    ("flux2", "klein-base-4b"): {"transformer": "flux-2-klein-base-4b.safetensors",
                                 "text_encoder": "qwen_3_4b.safetensors", "vae": "flux2-vae.safetensors"},
    ("flux2", "klein-base-9b"): {"transformer": "flux-2-klein-base-9b.safetensors",
                                 "text_encoder": "qwen_3_8b.safetensors", "vae": "flux2-vae.safetensors"},
    # FLUX.2 [dev] as ComfyUI's own repack ships it: fp8 with scales, Mistral cut after the layers FLUX.2 reads
    ("flux2", "dev"): {"transformer": "flux2_dev_fp8mixed.safetensors",
                       "text_encoder": "mistral_3_small_flux2_fp8.safetensors", "vae": "flux2-vae.safetensors"},
    ("flux1", "dev"): {"transformer": "flux1-dev.safetensors", "text_encoder": "clip_l.safetensors",
                       "text_encoder_2": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"},
}
# the components a flavour's ComfyUI files store in scaled fp8, and the decoder layers its text encoder file keeps
COMFY_FP8 = {("flux2", "dev"): ("transformer", "text_encoder")}
COMFY_TEXT_LAYERS = {("flux2", "dev"): 31}  # Mistral's first 31 of 40: FLUX.2 reads hidden states 10, 20 and 30
COMFY_FOLDERS = {"transformer": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders",
                 "text_encoder_2": "text_encoders"}

_WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def _comfy_text_name(component: Component, name: str) -> str | None:
    """ComfyUI's key for a text encoder tensor; None for what its files leave out (the language-model head tied
    to or unused beside the embedding, Mistral's image tower)."""
    if name == "lm_head.weight" or name.endswith(".lm_head.weight"):
        return None
    if component.class_name == "CLIPTextModel":
        return name if name.startswith("text_model.") else f"text_model.{name}"
    if component.class_name == "Mistral3ForConditionalGeneration":
        for stem in ("model.language_model.", "language_model.model."):
            if name.startswith(stem):
                return "model." + name[len(stem):]
        return None  # vision_tower, multi_modal_projector
    return name


def _whole(name: str, shape: tuple[int, ...]) -> tuple:
    return ((name, shape, 0, shape[0] if shape else 1),)


def _bfl_transformer(flavour: Flavour, tensors: dict) -> list[TensorSpec]:
    """BFL tensors as stacks of the diffusers tensors' rows (a fused qkv: q, k, v; norm_out's halves swapped)."""
    from trainer.sources.transformer_keys import bfl_shapes, transformer_plan

    shapes = {name: shape for name, (shape, _) in tensors.items()}
    plan = transformer_plan(flavour.family, shapes)
    segments: dict[str, list[tuple[int, tuple]]] = {}
    for name, pieces in plan.items():
        row = 0
        for piece in pieces:
            count = piece.stop - piece.start
            segments.setdefault(piece.key, []).append((piece.start, (name, shapes[name], row, row + count)))
            row += count
    return [TensorSpec(key, shape, parts=tuple(part for _, part in sorted(segments[key])))
            for key, shape in bfl_shapes(plan, shapes).items()]


def _scaled_fp8(specs: list[TensorSpec], seed: int) -> list[TensorSpec]:
    """The repeated layers' Linear weights in fp8 e4m3 with one fp32 `.weight_scale` each (ComfyUI's and BFL's
    scaled fp8: the largest value at fp8's largest); token tables, norms, biases and the layers outside the blocks
    stay bf16 (the "mixed" files)."""
    out = []
    for spec in specs:
        if len(spec.shape) == 2 and spec.name.endswith(".weight") and re.search(r"(blocks|layers)\.\d+\.", spec.name):
            scale = fp8_scale(spec, seed)
            out.append(replace(spec, dtype=torch.float8_e4m3fn, scale=scale))
            out.append(TensorSpec(spec.name.removesuffix("weight") + "weight_scale", (), torch.float32,
                                  tensor=torch.tensor(scale, dtype=torch.float32)))
        else:
            out.append(spec)
    return out


def _kept_layers(flavour: Flavour, specs: list[TensorSpec]) -> list[TensorSpec]:
    """A ComfyUI text encoder file cut after the decoder layers the flavour reads."""
    keep = COMFY_TEXT_LAYERS.get((flavour.family, flavour.name))
    if keep is None:
        return specs
    return [s for s in specs if not ((m := re.search(r"\.layers\.(\d+)\.", s.name)) and int(m[1]) >= keep)]


def file_specs(flavour: Flavour, component: Component, layout: str, seed: int = 0) -> list[TensorSpec]:
    """The tensors of one component's weights file(s), named as the layout stores them; the values are the same
    in both layouts (each comfy tensor is made of the hub tensors' rows; fp8 ones rounded)."""
    tensors = component.tensors
    if layout == "hub":
        return [TensorSpec(name, shape, dtype) for name, (shape, dtype) in tensors.items()]
    fp8 = component.name in COMFY_FP8.get((flavour.family, flavour.name), ())
    if component.name == "transformer":
        specs = _bfl_transformer(flavour, tensors)
        return _scaled_fp8(specs, seed) if fp8 else specs
    if component.name == "vae":  # small (84 M parameters): converted in memory by the same function tests use
        from trainer.sources.vae_keys import vae_diffusers_to_ldm

        state = {name: values(TensorSpec(name, shape, dtype), seed) for name, (shape, dtype) in tensors.items()}
        converted = vae_diffusers_to_ldm(state, flavour.family)
        return [TensorSpec(key, tuple(t.shape), t.dtype, tensor=t) for key, t in converted.items()]
    specs = [TensorSpec(key, shape, dtype, parts=_whole(name, shape)) for name, (shape, dtype) in tensors.items()
             if (key := _comfy_text_name(component, name)) is not None]
    if component.class_name == "CLIPTextModel":  # ComfyUI's clip_l carries the full CLIP's projection
        width = next(s.shape[0] for s in specs if s.name.endswith("final_layer_norm.weight"))
        specs.append(TensorSpec("text_projection.weight", (width, width)))
    specs = _kept_layers(flavour, specs)
    return _scaled_fp8(specs, seed) if fp8 else specs


def _save_config(component: Component, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if component.library == "diffusers":
        component.model.save_config(str(folder))
    else:
        component.model.config.save_pretrained(str(folder))


def _write_sharded(folder: Path, component: Component, specs: list[TensorSpec], seed: int,
                   say: Callable[[str], None]) -> None:
    stem = _WEIGHT_STEMS[component.library]
    shards = shard(specs, SHARD_BYTES)
    if len(shards) == 1:
        write_file(folder / f"{stem}.safetensors", shards[0], seed)
        say(f"  {component.name}: {folder.name}/{stem}.safetensors")
        return
    weight_map: dict[str, str] = {}
    for index, tensors in enumerate(shards, 1):
        name = f"{stem}-{index:05d}-of-{len(shards):05d}.safetensors"
        write_file(folder / name, tensors, seed)
        weight_map.update({spec.name: name for spec in tensors})
        say(f"  {component.name}: {name}")
    index_file = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index_file, indent=2), encoding="utf-8")


def _write_small_files(out: Path, flavour: Flavour, components: list[Component], tokenizers: dict[str, Any]) -> None:
    """model_index.json, the scheduler, the tokenizers and every component's config.json."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    index: dict[str, Any] = {"_class_name": flavour.pipeline_class, "_diffusers_version": diffusers.__version__}
    if flavour.pipeline_class == "Flux2KleinPipeline":
        index["is_distilled"] = False  # klein base: real CFG
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for component in components:
        index[component.name] = [component.library, component.class_name]
        _save_config(component, out / component.name)
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(str(out / name))
        index[name] = ["transformers", type(tokenizer).__name__]
    FlowMatchEulerDiscreteScheduler(**scheduler_config(flavour)).save_pretrained(str(out / "scheduler"))
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2), encoding="utf-8")


def write_hub(out: Path, flavour: Flavour, components: list[Component], tokenizers: dict[str, Any], seed: int,
              say: Callable[[str], None]) -> None:
    _write_small_files(out, flavour, components, tokenizers)
    for component in components:
        _write_sharded(out / component.name, component, file_specs(flavour, component, "hub"), seed, say)


def write_comfy(out: Path, flavour: Flavour, components: list[Component], tokenizers: dict[str, Any], seed: int,
                say: Callable[[str], None]) -> dict[str, Path]:
    """ComfyUI's models/ folder of single files plus source/ (configs, tokenizers, scheduler); slot -> file,
    relative to `out`."""
    _write_small_files(out / "source", flavour, components, tokenizers)
    names = COMFY_NAMES[(flavour.family, flavour.name)] if (flavour.family, flavour.name) in COMFY_NAMES else {
        c.name: f"{flavour.family}-{flavour.name}-{c.name}.safetensors" for c in components}
    files: dict[str, Path] = {}
    for component in components:
        relative = Path("models") / COMFY_FOLDERS[component.name] / names[component.name]
        write_file(out / relative, file_specs(flavour, component, "comfy", seed), seed)
        files[component.name] = relative
        say(f"  {component.name}: {relative}")
    return files
