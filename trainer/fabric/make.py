"""Fabricating a model: what a flavour's files need, the room check, the atomic folder (see the package's doc)."""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.errors import UserError
from trainer.fabric.layouts import file_specs, write_comfy, write_hub

# CLI names -> (family, flavour)
FLAVOURS = {"klein-base-4b": ("flux2", "klein-base-4b"), "klein-base-9b": ("flux2", "klein-base-9b"),
            "flux1-dev": ("flux1", "dev"), "flux2-dev": ("flux2", "dev")}
LAYOUTS = ("hub", "comfy")
MARKER = "fabricated.json"
DISK_MARGIN = 1 * 1024**3  # left free on the disk after writing
WRITER_RAM = 1.5 * 1024**3  # one slice of rows in fp32 and bf16, the meta models, python and torch
GIB = 1024**3

@dataclass(frozen=True)
class Fabricated:
    folder: Path
    layout: str
    bytes: int
    seconds: float
    source: Path  # the folder for model.source
    files: dict[str, Path]  # comfy layout: slot -> single file (empty for hub)


def flavour_of(name: str) -> registry.Flavour:
    if name not in FLAVOURS:
        raise UserError(f"fabricate: unknown flavour '{name}'; choose one of {', '.join(FLAVOURS)}")
    return registry.get_flavour(*FLAVOURS[name])


def _tokenizers(flavour: registry.Flavour) -> dict[str, Any]:
    from trainer.fabric import tokenizers

    if flavour.family == "flux1":
        return {"tokenizer": tokenizers.clip_tokenizer(), "tokenizer_2": tokenizers.t5_tokenizer()}
    if flavour.text_encoders[0] == "Mistral3ForConditionalGeneration":
        return {"tokenizer": tokenizers.mistral_tokenizer()}
    return {"tokenizer": tokenizers.qwen3_tokenizer()}


def plan(flavour: registry.Flavour, layout: str, small_encoders: bool = False) -> tuple[list, dict[str, Any]]:
    """The components (meta device) and tokenizers of a fabricated flavour."""
    if layout not in LAYOUTS:
        raise UserError(f"fabricate: --layout must be one of {', '.join(LAYOUTS)}, not '{layout}'")
    return _plan(flavour, small_encoders)


@functools.lru_cache(maxsize=4)  # both layouts of one flavour share them (the meta models take seconds to build)
def _plan(flavour: registry.Flavour, small_encoders: bool) -> tuple[list, dict[str, Any]]:
    from trainer.fabric.models import pipeline_components

    tokenizers = _tokenizers(flavour)
    return pipeline_components(flavour, small_encoders, tokenizers), tokenizers


def needed_bytes(flavour: registry.Flavour, layout: str, small_encoders: bool = False) -> int:
    """What the fabricated folder takes on disk (the weights; configs and tokenizers are a few MB)."""
    components, _ = plan(flavour, layout, small_encoders)
    # the comfy VAE holds the hub VAE's tensors renamed (and its 1x1 attention reshaped): the same bytes
    return sum(spec.nbytes for c in components for spec in file_specs(flavour, c, "hub" if c.name == "vae" else layout))


def check_room(folder: Path, need: int, what: str, contents: str = "") -> None:
    """Refuses before anything is written when the disk or the RAM cannot take it; one line, needs and has.
    `contents` says what `need` is made of (default: weights)."""
    import psutil

    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + DISK_MARGIN > free:
        raise UserError(f"{what}: needs {(need + DISK_MARGIN) / GIB:.1f} GiB of free disk in '{probe}' "
                        f"({contents or f'{need / GIB:.1f} GiB of weights'} + {DISK_MARGIN / GIB:.0f} GiB left free); "
                        f"it has "
                        f"{free / GIB:.1f} GiB. Free some space or choose another --out")
    available = psutil.virtual_memory().available
    if WRITER_RAM > available:
        raise UserError(f"{what}: needs {WRITER_RAM / GIB:.1f} GiB of available RAM; it has {available / GIB:.1f} GiB")


def existing(out: Path, flavour: registry.Flavour, layout: str, seed: int) -> Fabricated | None:
    """The complete fabricated folder at `out` when it holds this flavour, layout and seed; None otherwise."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (info.get("family"), info.get("flavour"), info.get("layout"), info.get("seed")) != (
            flavour.family, flavour.name, layout, seed):
        return None
    return Fabricated(out, layout, int(info["bytes"]), float(info["seconds"]), out / info["source"],
                      {slot: out / path for slot, path in info.get("files", {}).items()})


def fabricate(flavour: registry.Flavour, layout: str, out: str | Path, seed: int = 0, small_encoders: bool = False,
              progress: Any = None) -> Fabricated:  # noqa: ANN401 - a print-like callable
    """Writes the fabricated `flavour` in `layout` to `out` (which must not exist yet) and returns where."""
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise UserError(f"fabricate: --out '{out}' already exists; delete it or choose another folder")
    components, tokenizers = plan(flavour, layout, small_encoders)
    need = needed_bytes(flavour, layout, small_encoders)
    check_room(out.parent, need, "fabricate")
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # a killed fabricate's leftovers: never trusted, never reused
    partial.mkdir(parents=True)
    started = time.perf_counter()
    say = progress or (lambda line: None)
    if layout == "hub":
        write_hub(partial, flavour, components, tokenizers, seed, say)
        source, files = Path("."), {}
    else:
        files = write_comfy(partial, flavour, components, tokenizers, seed, say)
        source = Path("source")
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    info = {"family": flavour.family, "flavour": flavour.name, "layout": layout, "seed": seed, "bytes": size,
            "seconds": round(seconds, 1), "source": str(source), "small_encoders": small_encoders,
            "files": {slot: str(path) for slot, path in files.items()}}
    (partial / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
    partial.rename(out)
    return Fabricated(out, layout, size, seconds, out / source, {slot: out / p for slot, p in files.items()})


def real_width(flavour: registry.Flavour) -> registry.Flavour:
    """The flavour at its real widths with one double and one single block, its joint dimension fitted to the
    small text encoders (FLUX.2: three stacked layers of 16; FLUX.1: a T5 of 64): what the CI test trains."""
    from dataclasses import replace

    joint = 48 if flavour.family == "flux2" else 64
    return replace(flavour, double_blocks=1, single_blocks=1, joint_attention_dim=joint,
                   max_blocks_to_swap=registry._DERIVE)
