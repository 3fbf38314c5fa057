"""Checks of everything a job names on disk, before any model loads (no torch): one line per problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer import registry
from trainer.attention import check_attention
from trainer.data.datasets import IMAGE_EXTENSIONS, find_mask, list_images
from trainer.errors import UserError
from trainer.prompts import sample_prompts
from trainer.regular_files import file_problem
from trainer.sources import model_files
from trainer.sources.folder_fit import check_folder
from trainer.sources.lora_file import check_init_from
from trainer.sources.recognise import check_file
from trainer.spec import JobSpec, is_local_path
from trainer.trackers import missing_trackers


def model_source(spec: JobSpec) -> str:
    """The folder or hub id the model loads from: the spec's source, else the flavour's hub repo."""
    return spec.model.source or (registry.get_flavour(spec.model.family, spec.model.flavour).hub_id or "")


def model_identity(spec: JobSpec, slot: str) -> str:
    """What the weights of one component come from, for cache keys: the source, or its single file with the file's
    size and modification time (so caches made with one VAE or text encoder are never reused with another)."""
    path = getattr(spec.model, slot, "")
    if not path:
        return model_source(spec)
    try:
        stat = Path(path).stat()
    except OSError:
        return path
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def check_model(spec: JobSpec) -> list[str]:
    """Problems with the model's folder and files: missing, unreadable, or not the flavour the job names."""
    return _check_source(spec) + _check_single_files(spec)


def _check_source(spec: JobSpec) -> list[str]:
    source = model_source(spec)
    if not is_local_path(source):
        return []  # a hub id: checked when it downloads
    folder = Path(source)
    if not folder.exists():
        hint = " (build it with `python -m trainer demo --out DIR`)" if spec.model.flavour == "demo" else ""
        return [f"model.source: folder '{folder}' does not exist{hint}"]
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        return [f"model.source: cannot read folder '{folder}' (permission denied); check its permissions"]
    if not (folder / "model_index.json").is_file():
        return [f"model.source: '{folder}' is not a diffusers pipeline folder (no model_index.json in it)"]
    wrong = check_folder(folder, registry.get_flavour(spec.model.family, spec.model.flavour),
                         model_files(spec.model).given())
    if wrong:
        return wrong
    # a single file takes its component's configuration from the folder
    return [f"model.{slot}: its configuration comes from model.source, but '{folder / slot / 'config.json'}' does "
            "not exist" for slot in model_files(spec.model).given() if not (folder / slot / "config.json").is_file()]


def _check_single_files(spec: JobSpec) -> list[str]:
    """Each single file exists, reads as safetensors and holds what its slot needs (header only, no torch)."""
    problems: list[str] = []
    comfy = spec.model.comfy_models_dir
    if comfy and not Path(comfy).expanduser().is_dir():
        problems.append(f"model.comfy_models_dir: folder '{comfy}' does not exist; give ComfyUI's models folder "
                        "or leave it empty")
    flavour = registry.get_flavour(spec.model.family, spec.model.flavour)
    for slot, path in model_files(spec.model).given().items():
        problem = check_file(slot, path, flavour)
        if problem:
            problems.append(problem)
    return problems


def _check_datasets(spec: JobSpec) -> list[str]:
    if not spec.data.datasets:
        return ["data.datasets: no dataset given; add one with a `path` to a folder of images"]
    problems: list[str] = []
    total = 0
    for index, entry in enumerate(spec.data.datasets):
        folder = Path(entry.path)
        field = f"data.datasets[{index}].path"
        if not folder.is_dir():
            problems.append(f"{field}: '{folder}' is a file; give the folder that holds the images" if folder.exists()
                            else f"{field}: folder '{folder}' does not exist")
            continue
        if not os.access(folder, os.R_OK | os.X_OK):  # listing it would raise PermissionError
            problems.append(f"{field}: cannot read folder '{folder}' (permission denied); check its permissions")
            continue
        images = list_images(folder)
        if not images:
            problems.append(f"{field}: no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder}'")
        problems += _check_masks(entry.masks, images, f"data.datasets[{index}].masks")
        problems += _check_conditioning(entry.conditioning, folder, f"data.datasets[{index}].conditioning")
        total += len(images) * entry.repeats
    first = Path(spec.data.datasets[0].path)
    first_images = len(list_images(first)) if first.is_dir() and os.access(first, os.R_OK | os.X_OK) else 0
    if spec.data.eval_holdout and spec.data.eval_holdout >= first_images:
        problems.append(f"data.eval_holdout: {spec.data.eval_holdout} images held out of a first dataset of "
                        f"{first_images}; hold out fewer so some are left to train on")
    total -= spec.data.eval_holdout * spec.data.datasets[0].repeats
    if total > 0 and total < spec.train.batch_size:
        problems.append(
            f"train.batch_size: {spec.train.batch_size} is larger than the dataset ({total} images with repeats); "
            "lower it or add images"
        )
    return problems


def _check_masks(masks: str, images: list[Path], field: str) -> list[str]:
    if not masks:
        return []
    if not Path(masks).is_dir():
        return [f"{field}: folder '{masks}' does not exist"]
    missing = [image.name for image in images if find_mask(image, Path(masks)) is None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return [f"{field}: no mask with the same name for {shown}; add them or clear {field}"]
    return []


def _check_conditioning(conditioning: str | None, dataset: Path, field: str) -> list[str]:
    """The folder of an edit pair's references exists, is not the targets' own folder and holds images; which
    targets lack a reference is the health check's to say, file by file."""
    if not conditioning:
        return []
    folder = Path(conditioning)
    if not folder.is_dir():
        return [f"{field}: folder '{folder}' does not exist; give the folder of reference (before) images named like "
                f"the targets in '{dataset}', or remove the key"]
    if folder.resolve() == dataset.resolve():
        return [f"{field}: '{folder}' is the dataset folder itself, so every target would be its own reference; "
                "put the reference (before) images in a folder of their own"]
    if not list_images(folder):
        return [f"{field}: no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder}'; add a reference image named "
                "like each target"]
    return []


def _check_sample_references(spec: JobSpec) -> list[str]:
    problems = []
    for index, text in enumerate(spec.sample.reference_images):
        path = Path(text)
        if (problem := file_problem(path)) is not None:
            problems.append(f"sample.reference_images[{index}]: '{path}' {problem}; give an image file")
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(f"sample.reference_images[{index}]: '{path.name}' is not an image the trainer reads "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
    return problems


def _check_prompts(spec: JobSpec) -> list[str]:
    try:
        sample_prompts(spec)
    except UserError as exc:
        return [str(exc)]
    clip = spec.sample.clip_score_model
    if clip and is_local_path(clip) and not (Path(clip) / "config.json").is_file():
        return [f"sample.clip_score_model: '{clip}' is not a folder holding a transformers CLIP model (no "
                "config.json in it); give such a folder, a hub id (e.g. openai/clip-vit-base-patch32) or leave it "
                "empty"]
    return []


def _check_preview_decoder(spec: JobSpec) -> list[str]:
    """sample.preview_decoder, when a folder: a diffusers AutoencoderTiny taking this family's latents (a hub id
    is checked when it loads, trainer/previews.py)."""
    source = spec.sample.preview_decoder
    if not (source and is_local_path(source)):
        return []
    field, empty = "sample.preview_decoder", "or leave it empty to preview with the model's own VAE"
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"{field}: '{source}' is not a folder holding a diffusers AutoencoderTiny (no readable config.json "
                f"in it); give such a folder, a hub id (e.g. madebyollin/taef1 for FLUX.1) {empty}"]
    latent_channels = registry.get_flavour(spec.model.family, spec.model.flavour).latent_channels
    if config.get("_class_name") != "AutoencoderTiny":
        return [f"{field}: '{source}' holds a {config.get('_class_name') or 'model of no known class'}, not a "
                f"diffusers AutoencoderTiny; give a tiny autoencoder {empty}"]
    if config.get("latent_channels") != latent_channels:
        return [f"{field}: '{source}' decodes {config.get('latent_channels')}-channel latents, but this model's VAE "
                f"makes {latent_channels}; give the tiny autoencoder made for {spec.model.family} {empty}"]
    return []


def _check_output(spec: JobSpec) -> list[str]:
    comfy = spec.output.comfy_lora_dir
    if comfy and not (Path(comfy).is_dir() and os.access(comfy, os.W_OK)):
        return [f"output.comfy_lora_dir: '{comfy}' is not a writable folder; give ComfyUI's models/loras folder "
                "or leave it empty"]
    folder = Path(spec.output.dir)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return [f"output.dir: cannot write to '{folder}' ('{existing}' is not a writable folder); choose another"]
    return []


def check_files(spec: JobSpec) -> list[str]:
    """Every problem with the files and folders of a resolved spec; empty when the job can start."""
    problems = check_model(spec) + _check_datasets(spec) + _check_prompts(spec) + _check_sample_references(spec)
    problems += _check_preview_decoder(spec)
    problems += _check_output(spec)
    init_from = spec.lora.init_from and check_init_from(spec.lora.init_from, spec.model.family)
    problems += [init_from] if init_from else []
    return problems + missing_trackers(spec.output.log_with) + check_attention(spec)
