"""Advanced tab: how timesteps are drawn and weighted, guidance during training, LoRA targets, sampling."""

from __future__ import annotations

from typing import Any

import gradio as gr

from trainer import registry
from ui.form import field_choices


def sample_placeholders(family: str, flavour: str) -> tuple[str, str]:
    """Empty sample steps / guidance use the flavour's defaults: shown as the controls' placeholders."""
    try:
        info = registry.get_flavour(family, flavour)
    except KeyError:
        return "flavour default", "flavour default"
    return f"flavour default: {info.sample_steps}", f"flavour default: {info.sample_guidance}"


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Timesteps and loss")
    with gr.Row():
        fields["advanced.timestep_sampling"] = gr.Dropdown(
            choices=field_choices("advanced.timestep_sampling"), value=defaults["advanced.timestep_sampling"],
            label="Timestep sampling")
        fields["advanced.logit_mean"] = gr.Number(value=defaults["advanced.logit_mean"], label="Logit mean")
        fields["advanced.logit_std"] = gr.Number(value=defaults["advanced.logit_std"], label="Logit std")
    with gr.Row():
        fields["advanced.shift"] = gr.Number(
            value=defaults["advanced.shift"], label="Shift", info="used when auto shift is off")
        fields["advanced.auto_shift"] = gr.Checkbox(
            value=defaults["advanced.auto_shift"], label="Auto shift",
            info="resolution-dependent shift, as the flavour's scheduler computes it")
        fields["advanced.loss_weighting"] = gr.Dropdown(
            choices=field_choices("advanced.loss_weighting"), value=defaults["advanced.loss_weighting"],
            label="Loss weighting")
        fields["advanced.guidance_value"] = gr.Number(
            value=defaults["advanced.guidance_value"], label="Training guidance",
            info="guidance fed to models with a guidance embedding")
    gr.Markdown("### LoRA targets")
    fields["lora.targets"] = gr.Textbox(
        value=defaults["lora.targets"], label="Target modules",
        info="'all': every Linear in the transformer blocks; anything else is a module-name regex")
    gr.Markdown("### Sampling")
    steps_hint, guidance_hint = sample_placeholders(defaults["model.family"], defaults["model.flavour"])
    with gr.Row():
        fields["sample.steps"] = gr.Textbox(
            value=defaults["sample.steps"], label="Sample steps", placeholder=steps_hint,
            info="empty: the flavour's default")
        fields["sample.guidance"] = gr.Textbox(
            value=defaults["sample.guidance"], label="Sample guidance", placeholder=guidance_hint,
            info="empty: the flavour's default")
        fields["sample.seed"] = gr.Number(value=defaults["sample.seed"], precision=0, label="Sample seed")
