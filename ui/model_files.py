"""The Model tab's single-file choices: which files of a ComfyUI models/ folder can fill each slot of a job.

Pure python (no gradio, no torch): `scan` reads only safetensors headers (trainer.comfy_models) and every folder
or file a user names goes through the app's allowed-folders check (trainer.folders) before it is read, exactly like the
other paths of the form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trainer import registry
from trainer.comfy_models import Candidate, list_candidates
from trainer.folders import Folders, PathRefused

FOLDER_KEY = "model.comfy_models_dir"
SLOTS: tuple[str, ...] = ("transformer", "vae", "text_encoder", "text_encoder_2")
SLOT_KEYS: dict[str, str] = {slot: f"model.{slot}" for slot in SLOTS}
# The empty value means "this component from model.source"; the menu names that state like the low-VRAM menus
# name "from strategy", so clearing a slot is one choice rather than deleting text.
FROM_SOURCE: tuple[str, str] = ("from source (model.source)", "")
NOT_FITTING = "✗ "  # marks a file that does not fit the flavour; its label says why


def slot_visible(family: str, slot: str) -> bool:
    """text_encoder_2 (T5-XXL) exists only for FLUX.1; FLUX.2 has one text encoder and the spec refuses a second."""
    return slot != "text_encoder_2" or family == "flux1"


def candidate_label(candidate: Candidate) -> str:
    """What the menu shows: the component and where it lies; a file that does not fit says why in its label, so
    picking it anyway is an informed choice (the preflight check repeats the same line at Start)."""
    where = f"{candidate.folder}/{candidate.name}"
    if candidate.fits:
        return f"{where} — {candidate.label}"
    why = candidate.why.split(": ", 1)[-1] if candidate.why.startswith("model.") else candidate.why
    return f"{NOT_FITTING}{where} — does not fit: {why}"


def slot_choices(candidates: list[Candidate]) -> list[tuple[str, str]]:
    """(label, path) pairs for one dropdown: "from source" first, then the fitting files, then the others
    (list_candidates already sorts fitting files first)."""
    return [FROM_SOURCE, *((candidate_label(c), c.path) for c in candidates)]


@dataclass
class Scan:
    """A scan's result: per slot key the dropdown's (label, path) choices, and a line for the user."""

    choices: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    message: str = ""
    ok: bool = True


def empty_choices() -> dict[str, list[tuple[str, str]]]:
    return {key: [FROM_SOURCE] for key in SLOT_KEYS.values()}


def scan(folders: Folders, models_dir: str | None, family: str, flavour: str) -> Scan:
    """The dropdown choices for `family`/`flavour` from the ComfyUI folder `models_dir` (a relative path is taken
    from the workdir, as at Start). A folder outside the allowed ones is refused before anything is read."""
    typed = str(models_dir or "").strip()
    if not typed:
        return Scan(empty_choices(), "no ComfyUI models folder given: every component comes from model.source")
    try:
        folder = folders.check(typed, "ComfyUI models folder")
    except PathRefused as exc:
        return Scan(empty_choices(), str(exc), ok=False)
    if not folder.is_dir():
        return Scan(empty_choices(), f"the ComfyUI models folder {str(folder)!r} does not exist", ok=False)
    try:
        registry.get_flavour(family, flavour)
    except KeyError:
        return Scan(empty_choices(), f"unknown model {family}/{flavour}", ok=False)
    found = list_candidates(folder, family, flavour)
    choices = {SLOT_KEYS[slot]: slot_choices(found.get(slot, [])) for slot in SLOTS}
    counts = [f"{slot} {sum(c.fits for c in found.get(slot, []))}/{len(found.get(slot, []))}" for slot in SLOTS
              if slot_visible(family, slot)]
    return Scan(choices, f"{folder}: files fitting / found per slot: {', '.join(counts)}")


def refused_files(folders: Folders, values: Mapping[str, str | None]) -> list[str]:
    """A refusal line for each chosen single file (slot key → path) outside the allowed folders. A bare file name
    is looked up in the ComfyUI folder at Start, and that folder is checked itself; it is left out here."""
    paths = [(key, str(value).strip()) for key, value in values.items() if str(value or "").strip()]
    return folders.problems([(key, path) for key, path in paths if Path(path).name != path])
