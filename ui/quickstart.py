"""The quick start in plain python (no gradio, no torch): for the GPU chosen, the model to train and what it costs
(download, RAM on the first run), the whole form filled from the GPU's profile, the flavour's preset and the
defaults (ui/presets.py, the one merge order), and the estimator's one-line verdict against this machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.estimator.core import verdict
from trainer.estimator.job import estimate_job
from trainer.estimator.shapes import text_encoder_file_gib
from trainer.profiles import Profile, ProfileError, get_preset, list_presets
from trainer.spec import JobSpec, SpecError, deep_merge, parse_spec
from ui import form, presets

NO_GPU = "cpu-only"  # the profile the quick start takes without an NVIDIA GPU
# The flavour for a first LoRA: the smallest real FLUX.2 model below 15 GiB usable (its 16 GB download and
# 17 GB of first-run RAM suit a 8-12 GB desktop), the 9B one from there (better likeness, 32 GB to download);
# FLUX.2 [dev] (110 GB) is for those who choose it. Without a GPU only the demo trains in useful time.
SMALL_GPU_GIB = 15.0
FLAVOUR_FOR_SMALL_GPU = ("flux2", "klein-base-4b")
FLAVOUR_FOR_LARGER_GPU = ("flux2", "klein-base-9b")
DEMO_FLAVOUR = ("flux2", "demo")
VERDICTS = ("fits", "tight", "will not fit")  # the estimator's words, best first
NO_GPU_FOUND = ("No NVIDIA GPU was found on this machine, where the training runs: real FLUX models need one. "
                "Choose 'CPU only' for the demo.")
NO_GPU_NOTE = ("No NVIDIA GPU here: the quick start trains the built-in demo (a tiny random model, a minute on a "
               "CPU) to show a whole run. Real FLUX models need an NVIDIA GPU.")


@dataclass(frozen=True)
class Choice:
    """What the quick start proposes for one GPU (a hardware profile)."""

    profile: Profile
    family: str
    flavour: str
    preset: str | None

    @property
    def is_demo(self) -> bool:
        return registry.get_flavour(self.family, self.flavour).is_demo


def gpu_choices() -> list[tuple[str, str]]:
    """(label, profile name) for the GPU menu: the profiles, smallest first, without "no profile"."""
    return [(label, name) for label, name in presets.profile_choices() if name != presets.NO_PROFILE]


def gpu_found() -> bool:
    return presets.detected_profile() is not None


def default_gpu() -> str:
    """The detected GPU's profile, else the CPU-only one."""
    return presets.default_profile() or NO_GPU


def choose(profile_name: str | None) -> Choice:
    """The flavour and preset for a GPU; an unknown name counts as no GPU."""
    known = presets.profiles()
    profile = known.get(profile_name or "") or known[NO_GPU]
    if profile.vram_gib <= 0:
        family, flavour = DEMO_FLAVOUR
    elif profile.vram_gib < SMALL_GPU_GIB:
        family, flavour = FLAVOUR_FOR_SMALL_GPU
    else:
        family, flavour = FLAVOUR_FOR_LARGER_GPU
    preset = profile.preset_for(family, flavour)
    if preset is None:  # the profile suggests none (the CPU-only one): the flavour's smallest tier
        try:
            found = list_presets(family, flavour)
        except ProfileError:
            found = []
        preset = found[0].name if found else None
    return Choice(profile, family, flavour, preset)


def _gb(gib: float) -> str:
    """Sizes in words as a download manager shows them (GB), rounded: "about 16 GB"."""
    size = gib * 1.073741824
    return f"about {size:.0f} GB" if size >= 1 else "under 1 GB"


@functools.lru_cache(maxsize=16)
def _costs(family: str, flavour: str, preset: str | None) -> tuple[float, float]:
    """(download GiB, first-run RAM GiB) of a flavour under a preset: the hub's bf16 weights, and the estimator's
    RAM with the text encoder loaded (a first run has no cached embeddings)."""
    job: dict[str, Any] = {"model": {"family": family, "flavour": flavour, "source": "x"},
                           "data": {"datasets": [{"path": "x"}]}}
    if preset:
        job = deep_merge(get_preset(preset).spec, job)
    cold = parse_spec(deep_merge(job, {"data": {"cache_text_embeddings": "memory"}}))
    weights = parse_spec(deep_merge(job, {"model": {"base_precision": "bf16",
                                                            "text_encoder_precision": "bf16"}}))
    loaded = estimate_job(weights, None, suggest=False).components  # the text encoder as loaded: its layers read
    download = sum(gib for name, gib in loaded.items() if not name.startswith("text encoder"))
    flavour_info = registry.get_flavour(family, flavour)
    return download + text_encoder_file_gib(flavour_info), estimate_job(cold, None, suggest=False).ram_gib


def model_words(choice: Choice, gpu_found: bool = True) -> str:
    """Markdown: the model, what it downloads, the RAM its first run needs; the plain no-GPU note for the demo, and
    a warning when a GPU was chosen on a machine without one (it trains where the app runs)."""
    info = registry.get_flavour(choice.family, choice.flavour)
    if choice.is_demo:
        return f"**{info.label}** — built here in seconds, nothing to download.\n\n{NO_GPU_NOTE}"
    download, ram = _costs(choice.family, choice.flavour, choice.preset)
    text = (f"**{info.label}** — {_gb(download)} to download once (from `{info.hub_id}`); the first run needs "
            f"about {ram:.0f} GiB of RAM (it loads the text encoder; later runs reuse what it computed).")
    if not gpu_found:
        text += f"\n\n**{NO_GPU_FOUND}**"
    return text


def sample_prompts(trigger: str) -> list[str]:
    """What the samples show: the subject alone and in a scene, so the LoRA's effect is visible."""
    trigger = trigger.strip()
    if not trigger:
        return ["a photo", "a photo in a sunny park"]
    return [trigger, f"a photo of {trigger} in a sunny park"]


def fill(choice: Choice, workdir: Path, demo_dir: Path, images: str, trigger: str, name: str) -> presets.Filled:
    """The whole form for the quick start: defaults (the demo job's shape) with the model, images, trigger, LoRA
    name and sample prompts chosen here, under the GPU's profile and the flavour's preset. `images`: a folder
    (relative to the workdir, or absolute); empty trains the demo's own images (demo only)."""
    problems = []
    images, trigger, name = (images or "").strip(), (trigger or "").strip(), (name or "").strip()
    if not images and not choice.is_demo:
        problems.append("Images: upload images or give their folder first")
    if not name:
        problems.append("LoRA name: give the LoRA a name, e.g. my_style")
    if problems:
        return presets.Filled("not filled: " + "; ".join(problems), problems=problems)
    job = form.default_job(workdir)
    job["model"].update(family=choice.family, flavour=choice.flavour,
                        source=presets.suggested_source(demo_dir, choice.family, choice.flavour, ""))
    dataset = job["data"]["datasets"][0]
    dataset.update(trigger=trigger, **({"path": images} if images else {}))
    job["sample"]["prompts"] = sample_prompts(trigger or ("shapez" if choice.is_demo else ""))
    job["output"].update(name=name, dir=str(form.output_root(workdir).resolve() / name))
    try:
        values = form.spec_to_values(parse_spec(job))
    except SpecError as exc:
        return presets.Filled("not filled: the job would have problems", problems=exc.problems)
    # Nothing counts as the user's edit (the baseline is the values themselves): the preset decides everything but
    # the job's subject, which the defaults layer carries.
    return presets.fill(values, None, values, choice.profile.name, choice.preset, demo_dir)


def machine_ram_gib() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().total / 2**30


def verdict_line(spec: JobSpec, choice: Choice, ram_gib: float | None) -> str:
    """One line, its first word the worse of the two verdicts: the job's VRAM against the GPU and its RAM (the
    first run's, with the text encoder loaded) against this machine."""
    gpu_gib = choice.profile.vram_gib or None
    result = estimate_job(spec, gpu_gib, suggest=False)
    cold = spec.model_copy(update={"data": spec.data.model_copy(update={"cache_text_embeddings": "memory"})})
    ram_need = max(result.ram_gib, estimate_job(cold, gpu_gib, suggest=False).ram_gib)
    verdicts, parts = [], []
    if gpu_gib and result.verdict:
        verdicts.append(result.verdict)
        parts.append(f"{result.vram_gib:.1f} GiB VRAM of the {choice.profile.label}'s {gpu_gib:g} GiB")
    else:
        parts.append("no NVIDIA GPU: trains on the CPU")
    if ram_gib:
        verdicts.append(verdict(ram_need, ram_gib))
        parts.append(f"{ram_need:.1f} GiB RAM on the first run of this machine's {ram_gib:.0f} GiB")
    else:
        parts.append(f"{ram_need:.1f} GiB RAM on the first run (this machine's RAM is unknown)")
    word = max(verdicts, key=VERDICTS.index) if verdicts else "no verdict"
    return f"{word} — {', '.join(parts)}"
