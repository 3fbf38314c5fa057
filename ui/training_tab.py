"""Training tab: the LoRA's size, the optimiser and its schedule, samples during training, and where and how the
run is saved and logged."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.edit_pairs import edit_controls
from ui.form import PROMPT_SEPARATOR, field_choices
from ui.sliders import BoundSlider


def formats_for_comfy_folder(folder: str | None, formats: list[str] | None) -> list[str] | None:
    """The formats with comfyui ticked when a ComfyUI loras folder is given but neither comfyui nor kohya is (only
    those files are copied there: with diffusers alone the folder would stay empty); None when nothing changes."""
    formats = list(formats or [])
    if str(folder or "").strip() and not {"comfyui", "kohya"} & set(formats):
        return [*formats, "comfyui"]
    return None


def ema_device_info(has_ema: bool) -> str:
    if not has_ema:
        return "needs an EMA: set the EMA decay first"
    return "gpu: fast, costs VRAM (one fp32 copy of the LoRA); cpu: system RAM, copied each step"


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    """The tab's sections: the LoRA's size, the optimisation, the samples, the output."""
    _lora(fields, defaults)
    _optimisation(fields, defaults)
    _samples(fields, defaults)
    _output(fields, defaults)
    _connect_comfy_folder(fields)
    _connect_ema(fields)


def _connect_ema(fields: dict[str, gr.components.Component]) -> None:
    """Where the EMA is kept is editable only with an EMA decay."""
    def ema_device(decay: Any) -> Any:  # noqa: ANN401 - a gradio update
        has_ema = bool(str(decay if decay is not None else "").strip())
        return gr.update(interactive=has_ema, info=ema_device_info(has_ema))

    fields["train.ema_decay"].change(ema_device, fields["train.ema_decay"], fields["train.ema_device"],
                                     api_visibility="private", show_progress="hidden")


def _lora(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### LoRA")
    with gr.Row():
        fields["lora.rank"] = gr.Number(
            value=defaults["lora.rank"], precision=0, label="Rank",
            info="size of the adapter; 16-32 suits most subjects")
        fields["lora.alpha"] = gr.Number(
            value=defaults["lora.alpha"], label="Alpha", info="scale = alpha / rank")
        fields["lora.dropout"] = BoundSlider(
            0.0, 0.99, value=defaults["lora.dropout"], step=0.01, label="Dropout")


def _optimisation(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Optimisation")
    with gr.Row():
        fields["train.optimizer"] = gr.Dropdown(
            choices=field_choices("train.optimizer"), value=defaults["train.optimizer"], label="Optimizer",
            info="8bit: optimiser states in 8 bits, less memory; Lion wants a 3-10x lower learning rate than "
                 "AdamW; Prodigy finds its own step size: set the learning rate to ~1.0", scale=2)
        # The arrows step by a size that suits each value (gr.Number's default step of 1 makes 1e-4 into 1.0001).
        fields["train.learning_rate"] = gr.Number(
            value=defaults["train.learning_rate"], label="Learning rate", step=1e-5,
            info="e.g. 1e-4 for AdamW on FLUX; the arrows step by 0.00001")
        fields["train.weight_decay"] = gr.Number(
            value=defaults["train.weight_decay"], label="Weight decay", step=0.01,
            info="pulls the LoRA weights towards 0 each step; 0 turns it off")
    with gr.Row():
        fields["train.max_steps"] = gr.Number(
            value=defaults["train.max_steps"], precision=0, label="Run length (steps)",
            info="the whole run: Start trains this many; the Run tab's Train N steps goes towards it")
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
            value=defaults["train.max_grad_norm"], label="Max grad norm", step=0.1, info="0 turns clipping off")
        fields["train.mixed_precision"] = gr.Dropdown(
            choices=field_choices("train.mixed_precision"), value=defaults["train.mixed_precision"],
            label="Mixed precision")
        fields["train.seed"] = gr.Number(value=defaults["train.seed"], precision=0, label="Seed")
    with gr.Row():
        fields["train.ema_decay"] = gr.Textbox(
            value=defaults["train.ema_decay"], label="EMA decay", placeholder="empty: off; e.g. 0.999",
            info="keep an exponential moving average of the LoRA weights (between 0 and 1, not included), saved "
                 "beside the LoRA as <name>_ema in the same formats; steadier results on long runs")
        has_ema = bool(str(defaults["train.ema_decay"]).strip())
        fields["train.ema_device"] = gr.Dropdown(
            choices=field_choices("train.ema_device"), value=defaults["train.ema_device"], label="EMA kept on",
            interactive=has_ema, info=ema_device_info(has_ema))
        fields["train.compile"] = gr.Checkbox(
            value=defaults["train.compile"], label="Compile blocks (torch.compile)",
            info="compiles each transformer block once: faster steps after a slow first one; with block swap, "
                 "checkpointing and quantised bases alike; falls back to eager with a message where the platform "
                 "cannot compile (Windows without a C++ compiler)")


def _samples(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Samples")
    fields["sample.prompts"] = gr.Textbox(
        value=defaults["sample.prompts"], label="Sample prompts", lines=2,
        info=f"separate prompts with {PROMPT_SEPARATOR}; <token> becomes the trigger word; a prompt @name takes "
             "the prompt called name from the prompt library")
    fields["sample.reference_images"] = gr.Textbox(
        value=defaults["sample.reference_images"], label="Sample reference images",
        visible=edit_controls(defaults["model.family"], defaults["model.flavour"], defaults["dataset.conditioning"],
                              defaults["sample.reference_images"]).show_sample_references,
        info=f"edit flavours (Kontext, FLUX.2): the image each prompt edits — one for all, or one per prompt "
             f"separated with {PROMPT_SEPARATOR}; empty: the first edit pair's reference")
    with gr.Row():
        fields["sample.prompt_library"] = gr.Textbox(
            value=defaults["sample.prompt_library"], label="Prompt library", scale=3,
            info='optional: a TOML file of name = "prompt" lines, used by @name in the prompts')
        fields["sample.every_steps"] = gr.Number(
            value=defaults["sample.every_steps"], precision=0, label="Sample every N steps",
            info="0: only at the end of the run")


def _output(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Output")
    with gr.Row():
        fields["output.dir"] = gr.Textbox(value=defaults["output.dir"], label="Output folder", scale=3)
        fields["output.name"] = gr.Textbox(value=defaults["output.name"], label="LoRA name")
        fields["output.save_every_steps"] = gr.Number(
            value=defaults["output.save_every_steps"], precision=0, label="Save every N steps",
            info="0: only at the end of the run")
    with gr.Row():
        fields["output.keep_last"] = gr.Number(
            value=defaults["output.keep_last"], precision=0, label="Keep last",
            info="intermediate LoRAs and training states kept on disk; older ones are deleted")
        fields["output.save_state"] = gr.Checkbox(
            value=defaults["output.save_state"], label="Save training state for exact resume",
            info="optimiser, scheduler, RNG and data order beside each save; Resume continues from it")
        fields["output.log_with"] = gr.CheckboxGroup(
            choices=field_choices("output.log_with"), value=defaults["output.log_with"], label="Log with",
            info="loss, learning rate, speed and memory and the evaluation loss, in the output folder")
    with gr.Row():
        fields["output.formats"] = gr.CheckboxGroup(
            choices=field_choices("output.formats"), value=defaults["output.formats"], label="LoRA formats",
            info="diffusers: for diffusers' load_lora_weights; comfyui: the names ComfyUI loads (FLUX.1 and "
                 "FLUX.2); kohya: FLUX.1 only (Forge, kohya's scripts)")
        fields["output.comfy_lora_dir"] = gr.Textbox(
            value=defaults["output.comfy_lora_dir"], label="Copy to ComfyUI loras folder", scale=2,
            placeholder="optional: ComfyUI's models/loras folder",
            info="the comfyui (and kohya) file is copied there when the run ends and at each Save LoRA; typing a "
                 "folder ticks comfyui")


def _connect_comfy_folder(fields: dict[str, gr.components.Component]) -> None:
    """Typing a ComfyUI loras folder ticks the comfyui format."""
    def comfy_folder_input(folder: str, formats: list[str] | None) -> Any:  # noqa: ANN401 - a gradio update
        ticked = formats_for_comfy_folder(folder, formats)
        return gr.skip() if ticked is None else ticked

    folder = fields["output.comfy_lora_dir"]
    # .blur too: a pasted or filled-in path does not always fire .input; neither fires for a loaded job
    gr.on([folder.input, folder.blur], comfy_folder_input, [folder, fields["output.formats"]],
          fields["output.formats"], api_visibility="private", show_progress="hidden")
