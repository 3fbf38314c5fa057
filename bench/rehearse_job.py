"""The job a rehearsal runs (bench/rehearse.py): the flavour's smallest-tier preset over its hardware profile, as
the app merges them, pointed at a fabricated model and a few generated images, shortened to a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.registry import Flavour

GIB = 1024**3
# A full batch of text-encoder prompts (registry.TEXT_ENCODE_BATCH), each image its own caption as in a real
# dataset: the text-caching phase holds what any dataset of 8 captions or more holds.
IMAGES = 8
PROMPT = "a red circle on a blue background"


def family_formats(family: str) -> list[str]:
    """Every LoRA format the family writes (kohya is FLUX.1's layout only)."""
    return ["diffusers", "comfyui", "kohya"] if family == "flux1" else ["diffusers", "comfyui"]


def smallest_preset(flavour: Flavour) -> str:
    from trainer.profiles import list_presets

    presets = list_presets(flavour.family, flavour.name)
    if not presets:
        raise UserError(f"--preset: no preset for {flavour.label}; name one")
    return presets[0].name


def model_edits(flavour: Flavour, layout: str, model: Path) -> dict[str, Any]:
    """model.* for the fabricated folder: the hub folder as model.source, or ComfyUI's files and source/."""
    from trainer.fabric.layouts import COMFY_FOLDERS, COMFY_NAMES

    if layout == "hub":
        return {"source": str(model)}
    names = COMFY_NAMES[(flavour.family, flavour.name)]
    return {"source": str(model / "source"),
            **{slot: str(model / "models" / COMFY_FOLDERS[slot] / name) for slot, name in names.items()}}


def build_job(flavour: Flavour, layout: str, model: Path, work: Path, steps: int, resolution: int,
              preset: str | None, overrides: list[str], lowvram: dict[str, Any] | None = None) -> tuple[Path, Any]:
    """Writes work/job.toml and the dataset; returns (job path, spec). `lowvram`: settings over the preset's,
    before the job is checked (a shallow model allows fewer swapped blocks than the preset swaps)."""
    from trainer.demo import build_demo_dataset
    from trainer.profiles import apply_layers, get_preset
    from trainer.spec import load_spec, parse_spec, save_spec

    chosen = get_preset(preset or smallest_preset(flavour))
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "dataset"
    if dataset.exists():
        shutil.rmtree(dataset)
    build_demo_dataset(work, count=IMAGES, size=resolution)
    for index, caption in enumerate(sorted(dataset.glob("*.txt"))):  # the first is also the sample's prompt
        caption.write_text(PROMPT if index == 0 else f"{PROMPT}, study {index + 1}", encoding="utf-8")
    edits = {
        "model": model_edits(flavour, layout, model),
        "data": {"datasets": [{"path": str(dataset)}], "resolution": resolution},
        # one micro-batch per step: the memory of a step does not depend on accumulation, its time does
        "train": {"max_steps": steps, "gradient_accumulation": 1},
        "sample": {"prompts": [PROMPT], "steps": 2, "every_steps": 0, "resolution": resolution},
        "output": {"dir": str(work / "output"), "name": "rehearsal", "formats": family_formats(flavour.family),
                   "save_state": False},
        **({"lowvram": lowvram} if lowvram else {}),
    }
    job = work / "job.toml"
    save_spec(parse_spec(apply_layers({}, chosen.profile, chosen, edits)), job)
    spec = load_spec(job, overrides)
    save_spec(spec, job)
    return job, spec


def check_disk_and_ram(model_bytes: int, cache_bytes: int, folder: Path, peak_gib: float) -> None:
    """Refuses before anything starts when the fabricated model still to write and the block cache the run writes
    (lowvram.swap_from = "disk") do not fit the disk, or the predicted peak the available RAM: one line with what
    it needs and has."""
    import psutil

    from trainer.fabric.make import check_room

    if model_bytes + cache_bytes:
        contents = " + ".join(f"{size / GIB:.1f} GiB of {name}" for size, name in (
            (model_bytes, "fabricated weights"), (cache_bytes, "block cache")) if size)
        check_room(folder, model_bytes + cache_bytes, "rehearse", contents)
    available = psutil.virtual_memory().available / GIB
    if peak_gib > available:
        raise UserError(f"rehearse: the run needs {peak_gib:.1f} GiB of RAM at its peak (the estimate for this "
                        f"CPU-only run); this machine has {available:.1f} GiB available. Free memory, or lower it "
                        f"with --set (e.g. model.text_encoder_precision)")
