"""Low VRAM tab: the strategy (a named bundle of memory savers) and every saver as an override of it, the GPU
memory to plan for, VAE tiling; below, the plan the job would run with, in words, and the estimator's verdict,
both updated live as the job changes.

Each override has a "from strategy" state that leaves its spec key unset (see ui/form.py: FROM_STRATEGY, the
switch of the blocks-to-swap slider), so a job that leaves a key to the strategy still leaves it unset after a
trip through the form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from ui import form
from ui.memory import (
    DISK_READ_INFO,
    STRATEGY_HELP,
    SWAP_FROM_INFO,
    check_lowvram,
    largest_swap_bound,
    swap_bound,
    swap_source,
)
from ui.sliders import BoundSlider
from ui.words import labels_of

# The verdict line, coloured by its first word; the text stays plain for the API.
VERDICT_HTML = """<div class="memory-verdict ${(value || '').startsWith('fits') ? 'fits' :
(value || '').startsWith('tight') ? 'tight' : (value || '').startsWith('will not') ||
(value || '').startsWith('problems') ? 'bad' : 'info'}">${value || ''}</div>"""
VERDICT_CSS = """
.memory-verdict { font-size: 1.05rem; font-weight: 600; padding: 8px 12px; border-radius: 6px;
  border-left: 6px solid; }
.memory-verdict:empty { display: none; }
.fits { border-color: #16a34a; background: rgba(22, 163, 74, 0.12); }
.tight { border-color: #d97706; background: rgba(217, 119, 6, 0.12); }
.bad { border-color: #dc2626; background: rgba(220, 38, 38, 0.12); }
.info { border-color: #6b7280; background: rgba(107, 114, 128, 0.12); }
"""
TRISTATE = [form.FROM_STRATEGY, form.ON, form.OFF]


# What changes the memory a job needs: the live verdict listens to these controls' .change.
MEMORY_KEYS = tuple(key for key in form.FORM_KEYS if key.startswith(("lowvram.", "model."))) + (
    "data.resolution", "data.cache_text_embeddings", "data.vae_tiling", "lora.rank", "lora.type", "lora.targets",
    "train.batch_size", "train.optimizer", "train.mixed_precision", "sample.prompts", "sample.guidance",
    "dataset.conditioning", "sample.reference_images",  # edit pairs: reference tokens
    "train.ema_decay", "train.ema_device", "advanced.attention", "sample.resolution")


def strategy_table(selected: str) -> str:
    """Markdown: one line per strategy, shown under the menu; the selected one is marked."""
    return "\n".join(f"- **{name}**{' ← selected' if name == selected else ''} — {text}"
                     for name, text in STRATEGY_HELP.items())


def _tristate(fields: dict[str, gr.components.Component], defaults: dict[str, Any], key: str, label: str,
              info: str) -> None:
    fields[key] = gr.Dropdown(choices=TRISTATE, value=defaults[key], label=label, info=info)


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any],
          detected: float | None) -> Callable[[gr.State, gr.Blocks | None], None]:
    """The tab's controls; returns `connect(base, app)`, to call once every tab's fields exist (the live verdict
    reads the whole job). Needs the Model tab's family and flavour first (the slider's bound follows them)."""
    fields["lowvram.strategy"] = gr.Dropdown(
        choices=form.field_choices("lowvram.strategy"), value=defaults["lowvram.strategy"], label="Strategy",
        info="a bundle of the memory savers below; any saver set here overrides the bundle")
    strategy_note = gr.Markdown(strategy_table(defaults["lowvram.strategy"]))
    fields["lowvram.vram_gib"] = gr.Textbox(
        value=defaults["lowvram.vram_gib"], label="GPU memory to plan for (GiB)",
        placeholder=f"empty: the detected GPU ({detected:g} GiB)" if detected else "empty: the detected GPU (none)",
        info="what auto plans for and the verdict judges against; e.g. 8 to plan a job for a smaller card")
    _block_swap(fields, defaults)
    _checkpointing_and_offload(fields, defaults)
    gr.Markdown("### What this job would run with")
    first = check_lowvram(defaults, None, detected)
    verdict = gr.HTML(first.line, html_template=VERDICT_HTML, css_template=VERDICT_CSS, label="Memory verdict")
    plan = gr.Markdown(first.plan, label="Plan")
    return _connector(fields, detected, strategy_note, verdict, plan)


def _block_swap(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Block swap")
    most, value = swap_bound(defaults["model.family"], defaults["model.flavour"], defaults["lowvram.blocks_to_swap"])
    with gr.Row(equal_height=True):
        fields["lowvram.override_blocks_to_swap"] = gr.Checkbox(
            value=defaults["lowvram.override_blocks_to_swap"], label="Override blocks to swap", scale=1,
            info="off: the strategy decides")
        # The bound before the browser knows the flavour is the largest of any flavour, so an API call for a big
        # flavour is not refused by the slider; the page load and every flavour change set the flavour's own.
        fields["lowvram.blocks_to_swap"] = BoundSlider(
            0, largest_swap_bound(), value=value, step=1, label="Blocks to swap", scale=3,
            info=f"frozen weights of this many transformer blocks wait in CPU memory and stream to the GPU ahead "
                 f"of use (this flavour: at most {most})")
    with gr.Row():
        fields["lowvram.swap_prefetch"] = gr.Textbox(
            value=defaults["lowvram.swap_prefetch"], label="Prefetch (blocks)", placeholder="from strategy",
            info="blocks loaded ahead of the one computing (1-8); more hides the copies, costs VRAM")
        _tristate(fields, defaults, "lowvram.pin_memory", "Pin memory",
                  "page-locked CPU memory makes the copies asynchronous; on some Windows systems slower")
    with gr.Row():
        fields["lowvram.swap_from"] = gr.Dropdown(
            choices=[form.FROM_STRATEGY, *form.field_choices("lowvram.swap_from")],
            value=defaults["lowvram.swap_from"], label="Swapped blocks wait in", info=SWAP_FROM_INFO)
        fields["lowvram.disk_read_gbps"] = gr.Textbox(
            value=defaults["lowvram.disk_read_gbps"], label="Disk read speed (GB/s)", placeholder="3 (a typical NVMe)",
            info=DISK_READ_INFO)


def _checkpointing_and_offload(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Checkpointing and offload")
    with gr.Row():
        _tristate(fields, defaults, "lowvram.gradient_checkpointing", "Gradient checkpointing",
                  "recompute activations in backward: far less memory for ~25% more time per step")
        fields["lowvram.checkpointing_interval"] = gr.Textbox(
            value=defaults["lowvram.checkpointing_interval"], label="Checkpointing interval",
            placeholder="from strategy", info="checkpoint every n-th block (swapped blocks always); 1: every block")
        _tristate(fields, defaults, "lowvram.cpu_offload_checkpointing", "CPU offload of checkpoints",
                  "checkpoint inputs wait in CPU memory during forward")
    with gr.Row():
        _tristate(fields, defaults, "lowvram.optimizer_offload", "Optimiser offload",
                  "optimiser state and its step on the CPU")
        _tristate(fields, defaults, "lowvram.fused_backward", "Fused backward",
                  "step each parameter as soon as its gradient is complete (no gradient buffers; clipping per "
                  "parameter); not with fp16 or Prodigy")
        fields["lowvram.text_encoder_device"] = gr.Dropdown(
            choices=[form.FROM_STRATEGY, *form.field_choices("lowvram.text_encoder_device")],
            value=defaults["lowvram.text_encoder_device"], label="Text encoder device",
            info="where text encoders run while embeddings are cached: gpu, cpu, or offload (layers streamed)")
    fields["lowvram.empty_cache_every"] = gr.Textbox(
        value=defaults["lowvram.empty_cache_every"], label="Release cached GPU memory every N steps",
        placeholder="empty or 0: never",
        info="hands the CUDA allocator's cached, unused memory back to the driver every N steps (up to 1000000), "
             "for a card shared with a desktop; costs a little speed (the next step allocates afresh); no effect "
             "without a GPU")
    fields["data.vae_tiling"] = gr.Checkbox(
        value=defaults["data.vae_tiling"], label="VAE tiling",
        info="encode large images in overlapping tiles: caching fits a small card; latents differ slightly at the "
             "seams")


def _connector(fields: dict[str, gr.components.Component], detected: float | None, strategy_note: gr.Markdown,
               verdict: gr.HTML, plan: gr.Markdown) -> Callable[[gr.State, gr.Blocks | None], None]:
    """Wires the slider's bound and its switch; returns `connect(base, app)` for the live verdict."""
    # Moving the slider is an override: tick its switch, so the value counts.
    fields["lowvram.blocks_to_swap"].input(lambda: True, None, fields["lowvram.override_blocks_to_swap"],
                                           api_visibility="private", show_progress="hidden")

    def bound(current_family: str, current_flavour: str, current: Any) -> Any:  # noqa: ANN401
        most, value = swap_bound(current_family, current_flavour, current)
        return gr.update(maximum=most, value=value, info=f"frozen weights of this many transformer blocks wait in "
                         f"CPU memory and stream to the GPU ahead of use (this flavour: at most {most})")

    def connect(base: gr.State, app: gr.Blocks | None = None) -> None:
        model = [fields["model.family"], fields["model.flavour"], fields["lowvram.blocks_to_swap"]]
        triggers = [fields["model.family"].change, fields["model.flavour"].change]
        gr.on(triggers + ([app.load] if app is not None else []), bound, model, fields["lowvram.blocks_to_swap"],
              api_visibility="private", show_progress="hidden")

        def lowvram_check(values: dict[str, Any]) -> tuple[str, str]:
            """The plan the form's job would run with (in words) and the estimator's verdict on it: 'fits',
            'tight', 'will not fit' or 'no verdict', then the figures; 'problems — …' naming each bad field."""
            result = check_lowvram(values, values.pop("base", None), detected, labels_of(fields))
            return result.line, result.plan

        form_kwargs = {**{form.api_name(key): fields[key] for key in form.FORM_KEYS}, "base": base}
        # always_last: a loaded job changes many controls at once; only the last state needs a verdict.
        gr.on([fields[key].change for key in MEMORY_KEYS], form.keyword_handler(lowvram_check, extra=("base",)),
              inputs_kwargs=form_kwargs, outputs=[verdict, plan], api_name="lowvram_check",
              show_progress="hidden", trigger_mode="always_last")
        fields["lowvram.strategy"].change(strategy_table, fields["lowvram.strategy"], strategy_note,
                                          api_visibility="private", show_progress="hidden")

        def swap_source_controls(values: dict[str, Any]) -> tuple[Any, Any]:
            """Where swapped blocks wait, and the disk's speed, are editable only when the job's plan swaps
            blocks (and may read them from disk); each says why not."""
            found = swap_source(values, values.pop("base", None), detected)
            if found is None:
                return gr.skip(), gr.skip()
            return (gr.update(interactive=found.swaps, info=found.swap_info),
                    gr.update(interactive=found.reads_disk, info=found.gbps_info))

        gr.on([fields[key].change for key in MEMORY_KEYS] + ([app.load] if app is not None else []),
              form.keyword_handler(swap_source_controls, extra=("base",)), inputs_kwargs=form_kwargs,
              outputs=[fields["lowvram.swap_from"], fields["lowvram.disk_read_gbps"]], api_visibility="private",
              show_progress="hidden", trigger_mode="always_last")

    return connect
