"""Model tab: family, flavour, where the weights come from, and their precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from trainer import registry
from ui.form import field_choices
from ui.studio import Studio, flavour_summary


def flavour_choices(family: str) -> list[tuple[str, str]]:
    """(label, name) pairs: the dropdown shows the label and returns the flavour name."""
    return [(flavour.label, name) for name, flavour in registry.FAMILIES[family].flavours.items()]


def source_note(studio: Studio, family: str, flavour: str) -> str:
    try:
        info = registry.get_flavour(family, flavour)
    except KeyError:
        return ""
    if info.is_demo:
        return (f"The demo model, its dataset and job are built in `{studio.demo_dir}` on the first Start "
                "(about 15 s); later runs reuse them.")
    return (f"Empty: download `{info.hub_id}` from the Hugging Face hub. Or give another hub id, or the path of a "
            "diffusers-layout folder.")


def suggested_source(studio: Studio, family: str, flavour: str, current: str) -> str:
    """The demo folder for a demo flavour; empty (the hub repo) for others. A source the user typed stays."""
    current = (current or "").strip()
    in_demo = not current or Path(current).expanduser().resolve().is_relative_to(studio.demo_dir)
    if not in_demo:
        return current
    info = registry.get_flavour(family, flavour)
    return str(studio.demo_dir / family) if info.is_demo else ""


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any], studio: Studio) -> None:
    family, flavour = defaults["model.family"], defaults["model.flavour"]
    with gr.Row():
        fields["model.family"] = gr.Dropdown(
            choices=[(f.label, name) for name, f in registry.FAMILIES.items()], value=family, label="Family")
        fields["model.flavour"] = gr.Dropdown(
            choices=flavour_choices(family), value=flavour, label="Flavour")
    summary = gr.Markdown(flavour_summary(family, flavour))
    fields["model.source"] = gr.Textbox(
        value=defaults["model.source"], label="Source", placeholder="hub id (owner/name) or a diffusers folder")
    note = gr.Markdown(source_note(studio, family, flavour))
    precisions = field_choices("model.base_precision")
    with gr.Row():
        fields["model.base_precision"] = gr.Dropdown(
            choices=precisions, value=defaults["model.base_precision"], label="Base model precision",
            info="storage of the frozen transformer: bf16/fp16 as trained; fp8, int8, int4, nf4 quantised "
                 "(less VRAM, computed in bf16)")
        fields["model.text_encoder_precision"] = gr.Dropdown(
            choices=field_choices("model.text_encoder_precision"), value=defaults["model.text_encoder_precision"],
            label="Text encoder precision")

    def family_input(new_family: str, current_flavour: str, source: str) -> tuple[Any, str]:
        names = registry.flavour_names(new_family)
        new_flavour = current_flavour if current_flavour in names else names[0]
        return (gr.update(choices=flavour_choices(new_family), value=new_flavour),
                suggested_source(studio, new_family, new_flavour, source))

    def flavour_input(current_family: str, new_flavour: str, source: str) -> str:
        return suggested_source(studio, current_family, new_flavour, source)

    def describe(current_family: str, current_flavour: str) -> tuple[str, str]:
        return flavour_summary(current_family, current_flavour), source_note(studio, current_family, current_flavour)

    model = [fields["model.family"], fields["model.flavour"], fields["model.source"]]
    # .input (the user's choice), not .change: a loaded job sets family, flavour and source together.
    fields["model.family"].input(family_input, model, [fields["model.flavour"], fields["model.source"]],
                                 api_visibility="private")
    fields["model.flavour"].input(flavour_input, model, fields["model.source"], api_visibility="private")
    gr.on([fields["model.family"].change, fields["model.flavour"].change], describe, model[:2], [summary, note],
          api_visibility="private", show_progress="hidden")
