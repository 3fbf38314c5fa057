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


_TEXT_KINDS = {"Qwen3ForCausalLM": "qwen3", "Mistral3ForConditionalGeneration": "mistral", "CLIPTextModel": "clip",
               "T5EncoderModel": "t5"}


def load_components(folder: Path, flavour: Flavour, dtype: torch.dtype, skip: tuple[str, ...], base_precision: str,
                    files: ModelFiles, found: dict[str, Recognised], text_encoder_precision: str = "bf16",
                    modulation: str | None = None) -> dict[str, Any]:
    """Component name -> module, for the components built here: those given as files, a quantised transformer
    and every text encoder (streamed from its file or the folder's shards). The pipeline loads the others."""
    import diffusers

    from trainer.memory.quantize import FORMATS
    from trainer.sources.single_file import load_vae_file

    given = files.given()
    built: dict[str, Any] = {}
    if "transformer" not in skip and ("transformer" in given or base_precision in FORMATS):
        built["transformer"] = load_transformer_from(folder, flavour, dtype, base_precision, files, found, modulation)
    if "vae" in given and "vae" not in skip:
        built["vae"] = load_vae_file(given["vae"], found["vae"], _config_folder(folder, "vae", given["vae"]),
                                     getattr(diffusers, flavour.vae_class), dtype)
    for index, slot in enumerate(("text_encoder", "text_encoder_2")):
        # streamed here in every precision: transformers' from_pretrained keeps a 16-bit encoder's shards mapped
        # while it lives, and the pages read stay resident beside the copy (klein base 4B: +7.6 GiB of RSS)
        if slot not in skip and index < len(flavour.text_encoders):
            built[slot] = _text_encoder(folder, flavour, index, dtype, text_encoder_precision, files, found)
    return built


def _text_encoder(folder: Path, flavour: Flavour, index: int, dtype: torch.dtype, precision: str, files: ModelFiles,
                  found: dict[str, Recognised]) -> torch.nn.Module:
    """A text encoder from its single file, or streamed from the folder's shards (quantised or not)."""
    from trainer.sources.reader import FileReader
    from trainer.sources.single_file import fill_text_encoder

    slot = ("text_encoder", "text_encoder_2")[index]
    class_name = flavour.text_encoders[index]
    layers = flavour.text_encoder_layers if flavour.family == "flux2" else ()
    given = files.given()
    if slot in given:
        readers = [FileReader(given[slot], found[slot].prefix, f"model.{slot}")]
        return fill_text_encoder(readers, found[slot], _config_folder(folder, slot, given[slot]), class_name, dtype,
                                 layers, precision)
    shards = sorted((folder / slot).glob("*.safetensors"))
    if not shards:
        raise UserError(f"model.source: '{folder / slot}' holds no safetensors weights for the {class_name}")
    kind = _TEXT_KINDS[class_name]
    readers = [FileReader(shard, "", f"model.{slot}") for shard in shards]
    return fill_text_encoder(readers, Recognised(kind, class_name, layout="hf"), folder / slot, class_name, dtype,
                             layers, precision)


def load_transformer_from(folder: Path, flavour: Flavour, dtype: torch.dtype, base_precision: str, files: ModelFiles,
                          found: dict[str, Recognised], modulation: str | None = None,
                          sink: Any = None) -> torch.nn.Module:  # noqa: ANN401 - a block_store.BlockSink
    """The transformer: from its single file, else streamed from the folder (quantised, or whole blocks handed to
    a block-cache `sink`), else as diffusers loads it."""
    import diffusers

    from trainer.memory.quantize import FORMATS, load_quantized_transformer
    from trainer.sources.single_file import load_transformer_file

    transformer_class = getattr(diffusers, flavour.transformer_class)
    given = files.given()
    if "transformer" in given:
        return load_transformer_file(given["transformer"], found["transformer"],
                                     _config_folder(folder, "transformer", given["transformer"]), transformer_class,
                                     base_precision, dtype, modulation=modulation, sink=sink)
    if base_precision in FORMATS or sink is not None:
        return load_quantized_transformer(folder / "transformer", transformer_class, base_precision, dtype,
                                          modulation=modulation, sink=sink)
    model = transformer_class.from_pretrained(str(folder / "transformer"), torch_dtype=dtype, use_safetensors=True)
    return model.requires_grad_(False).eval()


def transformer_weight_files(source: str, flavour: Flavour, files: ModelFiles) -> list[Path]:
    """The files the transformer's weights come from (for the block cache's content key); a hub source is
    resolved to its local snapshot (fetched if needed)."""
    if files.transformer:
        return [Path(files.transformer)]
    skip = tuple(c for c in flavour.components if c != "transformer")
    folder = local_folder(source, flavour, skip, files)
    return sorted((folder / "transformer").glob("*.safetensors"))


def load_transformer(source: str, flavour: Flavour, dtype: torch.dtype, base_precision: str = "bf16",
                     files: ModelFiles | None = None, emit: Callable[[Event], None] | None = None,
                     modulation: str | None = None, sink: Any = None) -> torch.nn.Module:  # noqa: ANN401
    """The transformer alone, after the text encoders are gone (trainer/session.py loads in phases)."""
    files = files or ModelFiles()
    found = recognise_files(ModelFiles(transformer=files.transformer), flavour)
    skip = tuple(c for c in flavour.components if c != "transformer")
    folder = local_folder(source, flavour, skip, files, emit)
    return load_transformer_from(folder, flavour, dtype, base_precision, files, found, modulation, sink)


def load_pipeline(source: str, flavour: Flavour, dtype: torch.dtype, skip: tuple[str, ...] = (),
                  base_precision: str = "bf16", files: ModelFiles | None = None,
                  emit: Callable[[Event], None] | None = None, text_encoder_precision: str = "bf16",
                  modulation: str | None = None) -> Any:  # noqa: ANN401 - a diffusers pipeline
    """The flavour's pipeline from `source` and the single `files`; components in `skip` stay None.

    `dtype` is the compute dtype; `base_precision` the storage of the frozen transformer and
    `text_encoder_precision` of the text encoders (they stream in; fp8/int8/int4/nf4 are quantised as they do;
    `modulation`: FLUX.1's modulation format, see trainer.spec.modulation_format). `emit` receives download
    progress events."""
    import diffusers

    files = files or ModelFiles()
    found = recognise_files(files, flavour)
    folder = local_folder(source, flavour, skip, files, emit)
    # FLUX.2 dev's PixtralProcessor needs torchvision: its tokenizer, all the pipeline uses, loads alone (first: a
    # broken tokenizer folder is named in a second, before gigabytes of weights stream in)
    tokenizers = load_processor_tokenizers(folder, skip)
    built = load_components(folder, flavour, dtype, skip, base_precision, files, found, text_encoder_precision,
                            modulation)
    built.update(tokenizers)
    pipeline_class = getattr(diffusers, flavour.pipeline_class)
    left_out = {name: None for name in (*skip, *built)}
    # safetensors only: a pickled .bin in a downloaded or shared folder could run code when loaded
    pipe = pipeline_class.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, **left_out)
    if built:
        pipe.register_modules(**built)
    return pipe
