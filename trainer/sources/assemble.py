"""One pipeline from its sources: model.source (hub id or diffusers folder) plus any single files.

`load_pipeline` is what both families' `load_pipeline` call. Order: every named file is recognised and checked
against its slot first (a wrong file fails in a second, before gigabytes load); a hub source is fetched (only
what is needed); each component given as a file is built from it; the pipeline class then loads the rest from
the folder with those components left out and registers the built ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.events import Event
from trainer.registry import Flavour
from trainer.sources import ModelFiles
from trainer.sources.folder_fit import check_folder
from trainer.sources.processor_tokenizers import load_processor_tokenizers
from trainer.sources.recognise import NotSafetensors, Recognised, recognise_for, slot_problem
from trainer.spec import is_local_path


def recognise_files(files: ModelFiles, flavour: Flavour) -> dict[str, Recognised]:
    """Slot -> what its file holds; one UserError listing every file that is missing, unreadable or wrong."""
    found: dict[str, Recognised] = {}
    problems: list[str] = []
    for slot, path in files.given().items():
        field, file = f"model.{slot}", Path(path).expanduser()
        if not file.is_file():
            problems.append(f"{field}: file '{file}' does not exist")
            continue
        try:
            found[slot] = recognise_for(slot, file, flavour)
        except NotSafetensors as exc:
            problems.append(f"{field}: '{file}' is not a readable safetensors file ({exc})")
            continue
        problem = slot_problem(slot, file, found[slot], flavour)
        if problem:
            problems.append(problem)
    if problems:
        raise UserError("\n".join(problems))
    return found


def local_folder(source: str, flavour: Flavour, skip: tuple[str, ...], files: ModelFiles,
                 emit: Callable[[Event], None] | None = None) -> Path:
    """The diffusers folder to load from: `source` itself, or the hub snapshot of what this load needs."""
    if is_local_path(source):
        folder = Path(source).expanduser()
        if not (folder / "model_index.json").is_file():
            raise UserError(f"model.source: '{folder}' is not a diffusers pipeline folder (no model_index.json)")
    else:
        from trainer.sources.hub import fetch, needed_patterns

        folder = fetch(source, needed_patterns(flavour, skip, files), emit)
    problems = check_folder(folder, flavour, files.given())
    if problems:
        raise UserError("\n".join(problems))
    return folder


def _config_folder(folder: Path, component: str, slot_file: str) -> Path:
    config = folder / component
    if not (config / "config.json").is_file():
        raise UserError(f"model.{component}: the file '{Path(slot_file).name}' takes its configuration from "
                        f"model.source, but '{config / 'config.json'}' does not exist")
    return config


def load_components(folder: Path, flavour: Flavour, dtype: torch.dtype, skip: tuple[str, ...], base_precision: str,
                    files: ModelFiles, found: dict[str, Recognised]) -> dict[str, Any]:
    """Component name -> module, for the components built here: those given as files, and a quantised
    transformer streamed from the folder. The pipeline loads the others."""
    import diffusers

    from trainer.memory.quantize import FORMATS, load_quantized_transformer
    from trainer.sources.single_file import load_text_encoder_file, load_transformer_file, load_vae_file

    given = files.given()
    built: dict[str, Any] = {}
    transformer_class = getattr(diffusers, flavour.transformer_class)
    if "transformer" in skip:
        pass
    elif "transformer" in given:
        built["transformer"] = load_transformer_file(
            given["transformer"], found["transformer"], _config_folder(folder, "transformer", given["transformer"]),
            transformer_class, base_precision, dtype)
    elif base_precision in FORMATS:
        built["transformer"] = load_quantized_transformer(folder / "transformer", transformer_class, base_precision,
                                                          dtype)
    if "vae" in given and "vae" not in skip:
        built["vae"] = load_vae_file(given["vae"], found["vae"], _config_folder(folder, "vae", given["vae"]),
                                     getattr(diffusers, flavour.vae_class), dtype)
    for index, slot in enumerate(("text_encoder", "text_encoder_2")):
        if slot in given and slot not in skip:
            layers = flavour.text_encoder_layers if flavour.family == "flux2" else ()
            built[slot] = load_text_encoder_file(given[slot], found[slot], _config_folder(folder, slot, given[slot]),
                                                 flavour.text_encoders[index], dtype, layers)
    return built


def load_pipeline(source: str, flavour: Flavour, dtype: torch.dtype, skip: tuple[str, ...] = (),
                  base_precision: str = "bf16", files: ModelFiles | None = None,
                  emit: Callable[[Event], None] | None = None) -> Any:
    """The flavour's pipeline from `source` and the single `files`; components in `skip` stay None.

    `dtype` is the compute dtype; `base_precision` the storage of the frozen transformer (fp8/int8/int4/nf4 are
    quantised while the weights stream). `emit` receives download progress events."""
    import diffusers

    files = files or ModelFiles()
    found = recognise_files(files, flavour)
    folder = local_folder(source, flavour, skip, files, emit)
    built = load_components(folder, flavour, dtype, skip, base_precision, files, found)
    # FLUX.2 dev's PixtralProcessor needs torchvision: its tokenizer, all the pipeline uses, loads alone
    built.update(load_processor_tokenizers(folder, (*skip, *built)))
    pipeline_class = getattr(diffusers, flavour.pipeline_class)
    left_out = {name: None for name in (*skip, *built)}
    # safetensors only: a pickled .bin in a downloaded or shared folder could run code when loaded
    pipe = pipeline_class.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, **left_out)
    if built:
        pipe.register_modules(**built)
    return pipe
