"""The model files in a ComfyUI models/ folder that can fill each single-file slot of a job (no torch).

For the UI's file choices (model.transformer, model.vae, model.text_encoder, model.text_encoder_2):

    from trainer.comfy_models import list_candidates
    choices = list_candidates(spec.model.comfy_models_dir, "flux2", "klein-base-4b")
    for candidate in choices["transformer"]:      # files that fit the flavour come first
        candidate.path, candidate.name, candidate.folder, candidate.label, candidate.fits, candidate.why

Each slot lists the .safetensors files of its ComfyUI folders (diffusion_models and unet; vae; text_encoders and
clip; sub-folders included; and the FLUX all-in-one files of checkpoints, for every slot) whose header says they
hold that kind of component; `fits` tells whether it fits
the flavour and `why` says what is wrong otherwise (the same line the preflight check would print). A file that
is not a FLUX component, or that cannot be read, is left out. Reading a header is one small read per file, so a
folder of hundreds of large models lists in well under a second; results are cached by path, size and time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer import registry
from trainer.sources import COMFY_FOLDERS, SLOTS, comfy_models_folder
from trainer.sources.recognise import NotSafetensors, Recognised, expected, read_header, recognise_all, slot_problem

_cache: dict[tuple[str, int, int], list[Recognised]] = {}


@dataclass(frozen=True)
class Candidate:
    path: str  # absolute path: the value for the spec key
    name: str  # relative to its ComfyUI folder, as ComfyUI's loaders show it (e.g. "flux/flux1-dev.safetensors")
    folder: str  # that folder: diffusion_models, unet, vae, text_encoders, clip or checkpoints
    label: str  # what the file holds, e.g. "FLUX.2 [klein] base 4B transformer (bfl layout, fp8 e4m3) [...]"
    fits: bool  # fits the flavour asked for
    why: str = ""  # when it does not fit: the reason, naming the spec key


def _recognised(path: Path) -> list[Recognised]:
    """Every component the file holds (empty when it is unreadable or holds none)."""
    try:
        stat = path.stat()
    except OSError:
        return []
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        try:
            _cache[key] = recognise_all(read_header(path))
        except NotSafetensors:
            _cache[key] = []
    return _cache[key]


def _files(root: Path, folder: str) -> list[Path]:
    base = root / folder
    return sorted(p for p in base.rglob("*.safetensors") if p.is_file()) if base.is_dir() else []


def list_candidates(models_dir: str | Path, family: str, flavour: str) -> dict[str, list[Candidate]]:
    """Slot -> the files of `models_dir` (ComfyUI's models/ folder, or its install folder) holding that slot's
    kind of component, those fitting `family`/`flavour` first. A missing folder gives empty lists."""
    wanted = registry.get_flavour(family, flavour)
    result: dict[str, list[Candidate]] = {slot: [] for slot in SLOTS}
    if not models_dir:
        return result
    root = comfy_models_folder(models_dir)
    for slot in SLOTS:
        slot_kind = expected(slot, wanted)
        if slot_kind is None:
            continue  # e.g. FLUX.2 has no text_encoder_2
        seen: set[Path] = set()
        for folder in COMFY_FOLDERS[slot]:
            for path in _files(root, folder):
                components = _recognised(path)
                if folder == "checkpoints" and not any(c.kind == "transformer" for c in components):
                    continue  # an SDXL/SD checkpoint: its VAE and CLIP are not offered for FLUX
                found = next((c for c in components if c.kind == slot_kind.kind), None)
                if found is None or path in seen:
                    continue
                seen.add(path)
                problem = slot_problem(slot, path, found, wanted)
                result[slot].append(Candidate(
                    path=str(path.resolve()), name=path.relative_to(root / folder).as_posix(), folder=folder,
                    label=found.label, fits=problem is None, why=problem or ""))
        result[slot].sort(key=lambda c: (not c.fits, c.name.lower()))
    return result

