"""Hardware profiles and training presets in the form, in plain python (no gradio, no torch).

The form is filled in the one merge order of DESIGN.md, through `trainer.profiles.apply_layers`:
defaults < hardware profile < preset < the user's edits, where
- defaults: the spec's own defaults, with the job's model choice, its data, sample prompts and output location
  (what the job is about; no preset decides those);
- the user's edits: the form values that differ from the form's last fill (the app's defaults at first, then
  what the last preset filled in; a loaded job counts as edits). So a second preset replaces the first one's
  settings, while a rank the user typed survives both.
"""

from __future__ import annotations

import functools
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.demo import FAMILIES as DEMO_FAMILIES
from trainer.demo import demo_job_toml
from trainer.profiles import (
    Profile,
    ProfileError,
    apply_layers,
    detect_profile,
    get_preset,
    list_presets,
    list_profiles,
)
from trainer.spec import JobSpec, SpecError, deep_merge, parse_spec
from ui import form

NO_PROFILE = ""  # the menu's value for "no profile": nothing is merged for the hardware


@functools.lru_cache(maxsize=1)
def detected_profile() -> Profile | None:
    """The profile of this machine's first NVIDIA GPU (NVML, asked once); None without one or with a profile
    file that cannot be read (the menus then offer what they can)."""
    try:
        return detect_profile()
    except ProfileError:
        return None


def profiles() -> dict[str, Profile]:
    """name → profile: the profile files, and the detected GPU's own profile when no file names it."""
    found = {profile.name: profile for profile in list_profiles()}
    detected = detected_profile()
    if detected is not None:
        found.setdefault(detected.name, detected)
    return found


def profile_choices() -> list[tuple[str, str]]:
    """(label, name) pairs for the menu, "no profile" first, smallest GPU first."""
    choices = [("no profile", NO_PROFILE)]
    for name, profile in profiles().items():
        # the profile without a GPU says so in its own label ("CPU only (no NVIDIA GPU)")
        choices.append((f"{profile.label} ({profile.vram_gib:g} GiB usable)" if profile.vram_gib else profile.label,
                        name))
    return choices


def cpu_profile() -> str | None:
    """The name of the profile for a machine without a GPU (usable VRAM 0), if a profile file gives one."""
    return next((name for name, profile in profiles().items() if not profile.vram_gib), None)


def default_profile() -> str:
    """What the menu opens with: the detected GPU's profile; on a machine where NVML finds no GPU, the CPU
    profile; else none."""
    detected = detected_profile()
    if detected is not None:
        return detected.name
    if shutil.which("nvidia-smi") is not None:  # a GPU that NVML could not name: the user chooses
        return NO_PROFILE
    return cpu_profile() or NO_PROFILE


def preset_choices(family: str, flavour: str) -> list[tuple[str, str]]:
    """(label, name) pairs of the flavour's presets, smallest VRAM tier first."""
    try:
        return [(f"{preset.label} — {preset.description}", preset.name)
                for preset in list_presets(family, flavour)]
    except ProfileError:
        return []


def suggested_preset(profile_name: str | None, family: str, flavour: str) -> str | None:
    """The preset the profile suggests for the flavour, when it exists; None otherwise."""
    profile = profiles().get(profile_name or NO_PROFILE)
    name = profile.preset_for(family, flavour) if profile is not None else None
    return name if name in {choice for _, choice in preset_choices(family, flavour)} else None


def suggested_source(demo_dir: Path, family: str, flavour: str, current: str | None) -> str:
    """The demo folder for a demo flavour; empty (the hub repo) for others. A source the user typed stays."""
    current = (current or "").strip()
    in_demo = not current or Path(current).expanduser().resolve().is_relative_to(demo_dir)
    if not in_demo:
        return current
    try:
        info = registry.get_flavour(family, flavour)
    except KeyError:
        return current
    return str(demo_dir / family) if info.is_demo else ""


# ---------------------------------------------------------------------- leaving the demo

# What only the demo job sets: a real model trained with these (fp32 weights, 64 px, its large step, its folder of
# shapes, its trigger and prompts) makes a nonsense job.
DEMO_ONLY = ("model.base_precision", "model.text_encoder_precision", "data.resolution", "train.learning_rate",
             "train.mixed_precision", "dataset.path", "dataset.trigger", "sample.prompts")
EMPTY_WHEN_LEFT = ("dataset.path", "dataset.trigger", "sample.prompts")  # the user's own, not a default's


@functools.lru_cache(maxsize=4)
def _demo_values(family: str) -> dict[str, Any]:
    return form.spec_to_values(parse_spec(tomllib.loads(demo_job_toml(family))))


def is_demo(family: str, flavour: str) -> bool:
    try:
        return registry.get_flavour(family, flavour).is_demo
    except KeyError:
        return False


def leave_demo(values: dict[str, Any], family: str, flavour: str, demo_dir: Path) -> tuple[dict[str, Any], str]:
    """(key → value replacing each demo-only value still in the form, a notice naming them) for a form moving to
    `family`/`flavour`; nothing when that is a demo flavour too. The spec's defaults for the flavour stand in;
    the dataset, trigger and prompts are emptied (they are the user's to give)."""
    if is_demo(family, flavour):
        return {}, ""
    defaults = form.spec_to_values(parse_spec({"model": {"family": family, "flavour": flavour}}))
    changes: dict[str, Any] = {}
    for key in DEMO_ONLY:
        current = values.get(key)
        if key == "dataset.path":
            demo = bool(current) and Path(str(current)).expanduser().resolve().is_relative_to(demo_dir.resolve())
        else:
            demo = any(current == _demo_values(name)[key] for name in DEMO_FAMILIES)
        new = "" if key in EMPTY_WHEN_LEFT else defaults[key]
        if demo and current != new:
            changes[key] = new
    if not changes:
        return {}, ""
    shown = ", ".join(f"{key} {values.get(key)!r} → {new!r}" if new != "" else f"{key} emptied"
                      for key, new in changes.items())
    return changes, f"left the demo: its own values replaced ({shown})"


# ---------------------------------------------------------------------- filling the form


@dataclass
class Filled:
    """The form after a fill: `values` and `hidden` (fields without a control) to show, or the problems."""

    message: str
    values: dict[str, Any] | None = None
    hidden: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None  # the fill without the user's edits: the next fill's baseline
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def edits(values: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The nested spec dict of the form values that differ from `baseline` (the form's last fill). The dataset's
    fields are left out: the defaults layer carries the whole dataset list."""
    changed = {key: value for key, value in values.items()
               if key in form.FORM_KEYS and not key.startswith(form.DATASET) and baseline.get(key) != value}
    for switch, target in form.SWITCHES.items():  # a slider and its switch mean one setting together
        if switch in changed or target in changed:
            changed.update({key: values[key] for key in (switch, target) if key in values})
    data = form.values_to_dict(changed)
    data["data"].pop("datasets", None)
    return {section: table for section, table in data.items() if table}


def beyond_form(base: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of a loaded job that the form has no control for (e.g. output.formats): edits too, as the
    user's file set them."""
    kept = deep_merge({}, dict(base or {}))
    kept.get("data", {}).pop("datasets", None)  # the defaults layer carries them
    for key in form.FORM_KEYS:
        section, name = key.split(".", 1)
        kept.get(section, {}).pop(name, None)
    return {section: table for section, table in kept.items() if not isinstance(table, dict) or table}


def defaults_layer(current: dict[str, Any]) -> dict[str, Any]:
    """What no profile or preset decides: the model chosen, the datasets, the sample prompts and the images they
    edit (what the user wants to see; a preset only says how often) and the output location."""
    model = current.get("model", {})
    sample = current.get("sample", {})
    output = current.get("output", {})
    return {
        "model": {key: model[key] for key in ("family", "flavour", "source") if key in model},
        "data": {"datasets": current.get("data", {}).get("datasets", [])},
        "sample": {key: sample[key] for key in ("prompts", "prompt_library", "reference_images") if key in sample},
        "output": {key: output[key] for key in ("dir", "name") if key in output},
    }


def fill(values: dict[str, Any], base: dict[str, Any] | None, baseline: dict[str, Any], profile_name: str | None,
         preset_name: str | None, demo_dir: Path) -> Filled:
    """The form's job rebuilt as defaults < profile < preset < edits; the problems (naming the fields) when the
    result is not a valid job."""
    profile = profiles().get(profile_name or NO_PROFILE)
    try:
        if preset_name and preset_name not in {preset.name for preset in list_presets()}:
            message = f"not applied: unknown preset {preset_name!r}"  # a name, never a path to some other file
            return Filled(message, problems=[message])
        preset = get_preset(preset_name) if preset_name else None
    except ProfileError as exc:
        return Filled(f"not applied: {exc.problems[0]}", problems=exc.problems)
    if profile is None and preset is None:
        message = "not applied: choose a hardware profile or a preset"
        return Filled(message, problems=[message])
    model = form.values_to_dict(values, base).get("model", {})
    # a real flavour's preset over the demo: the demo's own values are not edits to keep
    left, left_notice = leave_demo(values, model.get("family", ""), model.get("flavour", ""), demo_dir)
    values, baseline = {**values, **left}, {**baseline, **left}
    current = form.values_to_dict(values, base)
    layers = (defaults_layer(current), profile, preset)
    try:
        spec = _parse(apply_layers(*layers, deep_merge(beyond_form(base), edits(values, baseline))), demo_dir)
    except SpecError as exc:
        return Filled("not applied: the job would have problems", problems=exc.problems)
    # The next fill tells the user's edits from this one's values by comparing with the fill without them, so an
    # edit survives any number of presets; a job valid only with the edits keeps them all as the baseline.
    try:
        plain = form.spec_to_values(_parse(apply_layers(*layers, beyond_form(base)), demo_dir))
    except SpecError:
        plain = form.spec_to_values(spec)
    names = [f"profile {profile.label}" if profile else "", f"preset {preset.label}" if preset else ""]
    left_notice = f"; {left_notice}" if left_notice else ""
    return Filled(f"applied {' and '.join(name for name in names if name)}; your edits kept{left_notice}",
                  form.spec_to_values(spec), spec.to_dict(), plain)


def _parse(job: dict[str, Any], demo_dir: Path) -> JobSpec:
    """The merged job with the model source that suits its flavour (the demo folder, or the hub repo in place of
    the demo's folder); raises SpecError."""
    model = job.setdefault("model", {})
    model["source"] = suggested_source(demo_dir, model.get("family", ""), model.get("flavour", ""),
                                       model.get("source"))
    return form.parse_form_dict(job)
