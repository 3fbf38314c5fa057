"""Training tab: the LoRA's size, the optimiser's schedule, samples during training, and where it is saved."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.form import PROMPT_SEPARATOR, field_choices


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### LoRA")
    with gr.Row():
        fields["lora.rank"] = gr.Number(
            value=defaults["lora.rank"], precision=0, label="Rank",
            info="size of the adapter; 16-32 suits most subjects")
        fields["lora.alpha"] = gr.Number(
            value=defaults["lora.alpha"], label="Alpha", info="scale = alpha / rank")
        fields["lora.dropout"] = gr.Slider(
            0.0, 0.99, value=defaults["lora.dropout"], step=0.01, label="Dropout")
    gr.Markdown("### Optimisation")
    with gr.Row():
        fields["train.learning_rate"] = gr.Number(value=defaults["train.learning_rate"], label="Learning rate")
        fields["train.max_steps"] = gr.Number(
            value=defaults["train.max_steps"], precision=0, label="Steps")
        fields["train.batch_size"] = gr.Number(
            value=defaults["train.batch_size"], precision=0, label="Batch size")
        fields["train.gradient_accumulation"] = gr.Number(
            value=defaults["train.gradient_accumulation"], precision=0, label="Gradient accumulation",
            info="steps whose gradients are summed before one update")
    with gr.Row():
        fields["train.scheduler"] = gr.Dropdown(
            choices=field_choices("train.scheduler"), value=defaults["train.scheduler"],
            label="Learning-rate schedule")
        fields["train.warmup_steps"] = gr.Number(
            value=defaults["train.warmup_steps"], precision=0, label="Warmup steps")
        fields["train.max_grad_norm"] = gr.Number(
            value=defaults["train.max_grad_norm"], label="Max grad norm", info="0 turns clipping off")
        fields["train.mixed_precision"] = gr.Dropdown(
            choices=field_choices("train.mixed_precision"), value=defaults["train.mixed_precision"],
            label="Mixed precision")
        fields["train.seed"] = gr.Number(value=defaults["train.seed"], precision=0, label="Seed")
    gr.Markdown("### Samples")
    fields["sample.prompts"] = gr.Textbox(
        value=defaults["sample.prompts"], label="Sample prompts", lines=2,
        info=f"separate prompts with {PROMPT_SEPARATOR}")
    fields["sample.every_steps"] = gr.Number(
        value=defaults["sample.every_steps"], precision=0, label="Sample every N steps",
        info="0: only at the end of the run")
    gr.Markdown("### Output")
    with gr.Row():
        fields["output.dir"] = gr.Textbox(value=defaults["output.dir"], label="Output folder", scale=3)
        fields["output.name"] = gr.Textbox(value=defaults["output.name"], label="LoRA name")
        fields["output.save_every_steps"] = gr.Number(
            value=defaults["output.save_every_steps"], precision=0, label="Save every N steps",
            info="0: only at the end of the run")
