"""Where the model's weights come from: a hub repo, a diffusers folder, or single files as ComfyUI keeps them.

What loads from what (`trainer.sources.assemble.load_pipeline`):

  component        from a single file (model.<slot>)                     else from model.source
  transformer      BFL layout (with or without `model.diffusion_model.`)  <source>/transformer
                   or a diffusers-layout file; bf16/fp16/fp32 or fp8
  vae              ae.safetensors (FLUX.1) / flux2-vae.safetensors        <source>/vae
                   (FLUX.2), BFL/ldm or diffusers layout
  text_encoder     FLUX.2: Qwen3 4B/8B (klein) or Mistral (dev);          <source>/text_encoder
                   FLUX.1: CLIP-L
  text_encoder_2   FLUX.1: T5-XXL                                          <source>/text_encoder_2
  tokenizers, scheduler, every component's config.json                    always from model.source

The rule for the missing pieces: model.source (empty = the flavour's hub repo) always supplies the tokenizers,
the scheduler and the configs; a single file replaces only the weights of its component. From a hub repo only
those small files are downloaded for a component given as a file (its `config.json`), the weights for the others.

Each file's architecture is recognised from its tensor names and shapes (`recognise.py`, no torch), so a file in
the wrong slot is refused before anything loads. This package's __init__ and `recognise` import no torch: the UI
and the preflight checks use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.registry import Flavour

SLOTS = ("transformer", "vae", "text_encoder", "text_encoder_2")

# ComfyUI's models/ sub-folders that hold each slot's files (its folder_paths names; `unet` and `clip` are the
# older names ComfyUI still reads). `checkpoints` holds all-in-one files (transformer, VAE and text encoders under
# their prefixes, e.g. flux1-dev-fp8.safetensors), which can fill every slot.
COMFY_FOLDERS: dict[str, tuple[str, ...]] = {
    "transformer": ("diffusion_models", "unet", "checkpoints"),
    "vae": ("vae", "checkpoints"),
    "text_encoder": ("text_encoders", "clip", "checkpoints"),
    "text_encoder_2": ("text_encoders", "clip", "checkpoints"),
}


@dataclass(frozen=True)
class ModelFiles:
    """The single files a job names, by slot; an empty path means that component comes from model.source."""

    transformer: str = ""
    vae: str = ""
    text_encoder: str = ""
    text_encoder_2: str = ""

    def given(self) -> dict[str, str]:
        """Slot -> path, for the slots that name a file."""
        return {slot: getattr(self, slot) for slot in SLOTS if getattr(self, slot)}


def comfy_models_folder(comfy_models_dir: str | Path) -> Path:
    """ComfyUI's models/ folder; its install folder (which holds models/) is accepted too."""
    folder = Path(comfy_models_dir).expanduser()
    if not any((folder / name).is_dir() for names in COMFY_FOLDERS.values() for name in names) \
            and (folder / "models").is_dir():
        return folder / "models"
    return folder


def resolve_file(slot: str, value: str, comfy_models_dir: str | Path = "") -> str:
    """The path a slot's value names: the path itself when it exists, else (a bare or relative name) the same
    name under one of the slot's ComfyUI folders, as ComfyUI's loaders list them; else the value unchanged
    (the preflight check then says it does not exist)."""
    if not value or Path(value).expanduser().exists() or not comfy_models_dir:
        return value
    root = comfy_models_folder(comfy_models_dir)
    for folder in COMFY_FOLDERS[slot]:
        candidate = root / folder / value
        if candidate.is_file():
            return str(candidate)
    return value


def model_files(model: Any) -> ModelFiles:
    """The ModelFiles of a spec's model section, bare names looked up in model.comfy_models_dir."""
    comfy = getattr(model, "comfy_models_dir", "")
    return ModelFiles(**{slot: resolve_file(slot, getattr(model, slot, ""), comfy) for slot in SLOTS})


def resolve_model_paths(model: dict[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """A copy of a spec's model table (as a dict) with its file paths taken from `base_dir` (the job file's
    folder): comfy_models_dir always, a slot's file when it exists there or no ComfyUI folder is set (a bare
    name is otherwise looked up in that folder by `model_files`)."""
    base = Path(base_dir)
    result = dict(model)

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    if result.get("comfy_models_dir"):
        result["comfy_models_dir"] = absolute(result["comfy_models_dir"])
    for slot in SLOTS:
        value = result.get(slot, "")
        if value and (not result.get("comfy_models_dir") or Path(absolute(value)).exists()):
            result[slot] = absolute(value)
    return result


def pipeline_class_problem(folder: str | Path, flavour: Flavour) -> str | None:
    """Why the diffusers folder cannot be the flavour's model, or None: its model_index.json must name the flavour's
    pipeline class (diffusers would otherwise load a FLUX.1 folder into a FLUX.2 pipeline, or FLUX.1 [dev]'s weights
    as Kontext, without a word)."""
    from trainer.registry import FAMILIES

    index = Path(folder) / "model_index.json"
    try:
        found = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        return f"model.source: cannot read '{index}' ({exc}); download or copy the model folder again"
    if found == flavour.pipeline_class:
        return None
    fitting = {family.name: [name for name, other in family.flavours.items() if other.pipeline_class == found]
               for family in FAMILIES.values()}
    fixes = [f"model.family {family} with model.flavour {_one_of(names)}" for family, names in fitting.items() if names]
    fix = f"set {' or '.join(fixes)}" if fixes else "choose a FLUX model folder"
    return (f"model.source: '{folder}' holds a {found or 'pipeline of no class'} (its model_index.json), but "
            f"{flavour.family} {flavour.name} needs a {flavour.pipeline_class}; {fix}, or point model.source at "
            f"a {flavour.label} folder")


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
