"""Edit pairs in the form: whether the chosen flavour takes reference images, and what the Dataset tab's reference
folder and the Training tab's sample reference images show for it. Pure python (no gradio).

Only FLUX.1 Kontext and the FLUX.2 flavours take a reference image (trainer/registry.py, `reference_images`); for
the others the controls are hidden and a note says why. A control that already holds a value stays visible, so a
job that the spec would refuse ("takes no reference image") can still be cleared from the form.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer import registry

HOW_PAIRS_WORK = (
    "Edit pairs teach the model to turn a reference (the *before* image) into its target (the *after*): put the "
    "targets, with their captions (the edit instruction), in the image folder above, and each reference, named "
    "like its target, in the reference folder. **strict**: a reference is cut exactly like its target (same "
    "framing, pixel-aligned edits); **loose**: it keeps its own aspect ratio at the same pixel area (other framings).")


@dataclass(frozen=True)
class EditControls:
    """What the edit-pair controls show for one flavour and the values they hold."""

    takes_references: bool
    note: str  # markdown above the Dataset tab's reference folder
    show_pairs: bool  # the reference folder and its match
    show_sample_references: bool  # the Training tab's sample reference images


def takes_references(family: str | None, flavour: str | None) -> bool:
    """Whether the flavour's pipeline takes reference images; an unknown pair (mid-change) counts as no."""
    try:
        return registry.get_flavour(str(family), str(flavour)).reference_images
    except (KeyError, ValueError):
        return False


def _label(family: str | None, flavour: str | None) -> str:
    try:
        return registry.get_flavour(str(family), str(flavour)).label
    except (KeyError, ValueError):
        return f"{family} {flavour}"


def edit_controls(family: str | None, flavour: str | None, conditioning: str | None = "",
                  reference_images: str | None = "") -> EditControls:
    """The controls' state for the chosen flavour, given what the reference folder and the sample reference images
    hold (text as the form shows it)."""
    if takes_references(family, flavour):
        return EditControls(True, HOW_PAIRS_WORK, True, True)
    has_pairs = bool((conditioning or "").strip())
    has_samples = bool((reference_images or "").strip())
    note = (f"**{_label(family, flavour)} takes no reference image.** Edit pairs train FLUX.1 Kontext or a "
            "FLUX.2 flavour: choose one on the Model tab to set them up.")
    if has_pairs or has_samples:
        held = " and ".join(name for name, held in (("the reference folder", has_pairs),
                                                     ("the sample reference images (Training tab)", has_samples))
                            if held)
        note += f" Clear {held}, or the job will not start."
    return EditControls(False, note, has_pairs, has_samples)
