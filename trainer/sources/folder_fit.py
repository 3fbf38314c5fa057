"""A diffusers folder's components against the flavour a job names, from their config.json files alone.

The transformer's architecture (see architecture.py), each text encoder's kind, width and depth (FLUX.2 stacks
hidden-state layers 9/18/27 of Qwen3, 10/20/30 of Mistral: a shallower encoder has none of them) and the VAE's
latent channels. No weights are read. Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.sources import pipeline_class_problem
from trainer.sources.architecture import mismatch, of_config
from trainer.sources.recognise import NotSafetensors, expected, read_raw_header

_TRANSFORMER_FAMILY = {"Flux2Transformer2DModel": "flux2", "FluxTransformer2DModel": "flux1"}
# transformers' model_type -> the kind recognise.py names
_TEXT_KINDS = {"qwen3": "qwen3", "mistral3": "mistral", "mistral": "mistral", "clip_text_model": "clip",
               "t5": "t5"}


def _config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a missing or unreadable config is the loader's (or the pipeline-class check's) to report
    return data if isinstance(data, dict) else None


def _transformer(path: Path, config: dict[str, Any], flavour: registry.Flavour) -> str | None:
    family = _TRANSFORMER_FAMILY.get(str(config.get("_class_name", "")))
    if family is None:
        return (f"model.source: '{path}' is a {config.get('_class_name') or 'model of no class'}, not a FLUX "
                f"transformer; point model.source at a {flavour.label} folder")
    return mismatch("model.source", str(path), of_config(config, family), flavour)


def _text_encoder(path: Path, config: dict[str, Any], slot: str, flavour: registry.Flavour) -> str | None:
    wanted = expected(slot, flavour)
    if wanted is None:
        return None
    kind = _TEXT_KINDS.get(str(config.get("model_type", "")), "")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    width = int(text.get("hidden_size") or text.get("d_model") or 0)
    layers = int(text.get("num_hidden_layers") or text.get("num_layers") or 0)
    needed = max(flavour.text_encoder_layers, default=0)
    if kind == wanted.kind and width == wanted.hidden_size and layers >= needed:
        return None
    what = f"a {config.get('model_type') or 'model of no type'} text encoder of width {width} with {layers} layers"
    need = f"; {flavour.label} stacks its hidden-state layers {flavour.text_encoder_layers}" if needed else ""
    return (f"model.source: '{path}' is {what}, not {wanted.label}{need}; point model.source at a {flavour.label} "
            f"folder or give that text encoder in model.{slot}")


def _vae(path: Path, config: dict[str, Any], flavour: registry.Flavour) -> str | None:
    channels = int(config.get("latent_channels") or 0)
    if config.get("_class_name") == flavour.vae_class and channels == flavour.latent_channels:
        return None
    return (f"model.source: '{path}' is a {config.get('_class_name') or 'model of no class'} with {channels} latent "
            f"channels, not the {flavour.latent_channels}-channel {flavour.vae_class} {flavour.label} needs; point "
            f"model.source at a {flavour.label} folder or give that VAE in model.vae")


def folder_problem(folder: str | Path, flavour: registry.Flavour, given: Iterable[str] = ()) -> str | None:
    """One line when a component of the diffusers `folder` is not the flavour's (the first found: transformer,
    text encoders, VAE); components given as single files (`given`) are checked as files instead."""
    skip = set(given)
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        if component in skip or component not in flavour.components:
            continue
        path = Path(folder) / component / "config.json"
        config = _config(path)
        if config is None:
            continue
        if component == "transformer":
            problem = _transformer(path, config, flavour)
        elif component == "vae":
            problem = _vae(path, config, flavour)
        else:
            problem = _text_encoder(path, config, component, flavour)
        if problem:
            return problem
    return None


def damaged_weights(folder: str | Path, flavour: registry.Flavour, given: Iterable[str] = ()) -> list[str]:
    """One line per weight file of the folder's components (those not given as single files) that is damaged: a
    header that does not read, fewer bytes than its tensors need, or a shard its index names that is missing."""
    skip, problems = set(given), []
    for component in flavour.components:
        if component in skip or not (Path(folder) / component).is_dir():
            continue
        for index in sorted((Path(folder) / component).glob("*.safetensors.index.json")):
            problems += _missing_shards(index)
        for path in sorted((Path(folder) / component).glob("*.safetensors")):
            try:
                read_raw_header(path)
            except NotSafetensors as exc:
                fix = "" if "again" in str(exc) else "; download or copy the model folder again"
                problems.append(f"model.source: '{path}' is damaged ({exc}){fix}")
    return problems


def _missing_shards(index: Path) -> list[str]:
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"model.source: '{index}' cannot be read ({exc}); download or copy the model folder again"]
    return [f"model.source: '{index.parent / shard}' is missing (named by {index.name}); download or copy the model "
            "folder again" for shard in sorted(shards) if not (index.parent / shard).is_file()]


def check_folder(folder: str | Path, flavour: registry.Flavour, given: Iterable[str] = ()) -> list[str]:
    """Why the diffusers `folder` cannot be loaded as `flavour`, one line each; empty when it can: its components'
    architecture first (it names the flavour to choose), then the pipeline class its model_index.json names, then
    every damaged weight file."""
    wrong = folder_problem(folder, flavour, given) or pipeline_class_problem(folder, flavour)
    return [wrong] if wrong else damaged_weights(folder, flavour, given)
