"""Advanced tab: how timesteps are drawn and weighted, guidance during training, TREAD token routing, the LoRA
adapter (type, init, targets), the evaluation loss, and sampling."""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr

from trainer import registry
from trainer.attention import backend_problem, computes_in_16_bit, installed
from ui.form import field_choices, target_choices, targets_for_family
from ui.model_info import target_counts
from ui.sliders import BoundSlider


def sample_placeholders(family: str, flavour: str) -> tuple[str, str]:
    """Empty sample steps / guidance use the flavour's defaults: shown as the controls' placeholders."""
    try:
        info = registry.get_flavour(family, flavour)
    except KeyError:
        return "flavour default", "flavour default"
    return f"flavour default: {info.sample_steps}", f"flavour default: {info.sample_guidance}"


GUIDANCE_MODE_INFO = ("for models with a guidance embedding (FLUX.1 dev/krea/kontext, FLUX.2 dev): constant uses the "
                      "value, random draws one per image between min and max")


def guidance_interactivity(mode: str, embedded: bool = True) -> tuple[bool, bool]:
    """(fixed value editable, range editable) for a guidance mode: each mode reads only its own controls, and none
    counts for a flavour without a guidance embedding."""
    return embedded and mode != "random", embedded and mode == "random"


def takes_guidance(family: str, flavour: str) -> bool:
    """Whether the flavour has a guidance embedding (what the training guidance feeds); True when unknown."""
    try:
        return registry.get_flavour(family, flavour).guidance == "embedded"
    except KeyError:
        return True


def guidance_mode_info(family: str, flavour: str) -> str:
    if takes_guidance(family, flavour):
        return GUIDANCE_MODE_INFO
    try:
        label = registry.get_flavour(family, flavour).label
    except KeyError:
        label = flavour
    return f"{label} has no guidance embedding: these settings are not used by this flavour"


@functools.lru_cache(maxsize=1)
def _gpu_capability() -> tuple[int, int] | None:
    from trainer.attention import gpu_capability  # torch, once: only when a kernel's package is installed

    return gpu_capability()


def attention_info(mixed_precision: str, base_precision: str) -> str:
    """The attention menu's help: what each kernel is, and for this machine and job the reason validate gives for
    each one it refuses (the package, the GPU, fp32 compute)."""
    sixteen_bit = computes_in_16_bit(mixed_precision, base_precision)
    notes = []
    for backend in field_choices("advanced.attention")[1:]:
        capability = _gpu_capability() if installed(backend) else None
        problem = backend_problem(backend, capability, sixteen_bit)
        notes.append(f"{backend}: {'refused here, it ' + problem if problem else 'available here'}")
    return ("sdpa (default): torch's own kernel, always available; flash, xformers: their packages' kernels; sage "
            "renders the samples only (training steps keep sdpa). " + ". ".join(notes))


def mode_scale_info(timestep_sampling: str) -> str:
    if timestep_sampling == "mode":
        return "how strongly the mode sampling favours the middle noise levels (SD3's 1.29)"
    return "used by timestep sampling 'mode' only"


def sample_resolution_placeholder(family: str, flavour: str) -> str:
    try:
        return f"flavour default: {registry.get_flavour(family, flavour).sample_resolution}"
    except KeyError:
        return "flavour default"


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    """The tab's controls; needs `fields["model.family"]` and `fields["model.flavour"]` (the Model tab) first."""
    _timesteps(fields, defaults)
    _guidance(fields, defaults)
    _tread(fields, defaults)
    count, counts = _adapter(fields, defaults)
    _evaluation_and_sampling(fields, defaults)
    _connect(fields, count, counts)


def _timesteps(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Timesteps and loss")
    with gr.Row():
        fields["advanced.timestep_sampling"] = gr.Dropdown(
            choices=field_choices("advanced.timestep_sampling"), value=defaults["advanced.timestep_sampling"],
            label="Timestep sampling")
        fields["advanced.logit_mean"] = gr.Number(value=defaults["advanced.logit_mean"], label="Logit mean", step=0.1)
        fields["advanced.logit_std"] = gr.Number(value=defaults["advanced.logit_std"], label="Logit std", step=0.1)
        fields["advanced.mode_scale"] = gr.Number(
            value=defaults["advanced.mode_scale"], label="Mode scale", step=0.01,
            interactive=defaults["advanced.timestep_sampling"] == "mode",
            info=mode_scale_info(defaults["advanced.timestep_sampling"]))
    with gr.Row():
        fields["advanced.shift"] = gr.Number(
            value=defaults["advanced.shift"], label="Shift", step=0.1, info="used when auto shift is off")
        fields["advanced.auto_shift"] = gr.Checkbox(
            value=defaults["advanced.auto_shift"], label="Auto shift",
            info="resolution-dependent shift, as the flavour's scheduler computes it")
        fields["advanced.loss_weighting"] = gr.Dropdown(
            choices=field_choices("advanced.loss_weighting"), value=defaults["advanced.loss_weighting"],
            label="Loss weighting")
    with gr.Row():
        fields["advanced.min_timestep"] = gr.Number(
            value=defaults["advanced.min_timestep"], precision=0, label="Min timestep",
            info="0-1000: drawn noise levels are mapped into [min, max] / 1000; raise it to skip the finest detail")
        fields["advanced.max_timestep"] = gr.Number(
            value=defaults["advanced.max_timestep"], precision=0, label="Max timestep",
            info="0-1000, above min; lower it to leave out the noisiest steps (composition)")


def _guidance(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Guidance while training")
    embedded = takes_guidance(defaults["model.family"], defaults["model.flavour"])
    fixed, ranged = guidance_interactivity(defaults["advanced.guidance_mode"], embedded)
    with gr.Row():
        fields["advanced.guidance_mode"] = gr.Dropdown(
            choices=field_choices("advanced.guidance_mode"), value=defaults["advanced.guidance_mode"],
            label="Guidance mode", interactive=embedded,
            info=guidance_mode_info(defaults["model.family"], defaults["model.flavour"]))
        fields["advanced.guidance_value"] = gr.Number(
            value=defaults["advanced.guidance_value"], label="Training guidance", step=0.5, interactive=fixed,
            info="constant mode: the guidance fed to the model (and to the evaluation loss)")
        fields["advanced.guidance_min"] = gr.Number(
            value=defaults["advanced.guidance_min"], label="Guidance min", step=0.5, interactive=ranged,
            info="random mode: lowest guidance drawn")
        fields["advanced.guidance_max"] = gr.Number(
            value=defaults["advanced.guidance_max"], label="Guidance max", step=0.5, interactive=ranged,
            info="random mode: highest guidance drawn")


def _tread(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### TREAD (faster steps)")
    with gr.Row():
        fields["advanced.tread"] = gr.Checkbox(
            value=defaults["advanced.tread"], label="TREAD token routing",
            info="a random share of image tokens skips a span of blocks: faster steps, usually at a small cost "
                 "in quality")
        fields["advanced.tread_selection_ratio"] = BoundSlider(
            0.0, 0.99, value=defaults["advanced.tread_selection_ratio"], step=0.01, label="Selection ratio",
            info="share of image tokens that skip the span")
        fields["advanced.tread_start_block"] = gr.Number(
            value=defaults["advanced.tread_start_block"], precision=0, label="Start block",
            info="first skipped block (double blocks first, then single); negative counts from the end")
        fields["advanced.tread_end_block"] = gr.Number(
            value=defaults["advanced.tread_end_block"], precision=0, label="End block",
            info="last skipped block; negative counts from the end (-1 is the last block)")


def _adapter(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> tuple[gr.Button, gr.Markdown]:
    """The adapter's type, init, start file and targets; returns the Count button and the Markdown it fills."""
    gr.Markdown("### LoRA adapter")
    with gr.Row():
        fields["lora.type"] = gr.Dropdown(
            choices=field_choices("lora.type"), value=defaults["lora.type"], label="Adapter type",
            info="lora: B·A low-rank update; lokr: Kronecker-product update (peft LoKr)")
        fields["lora.init"] = gr.Dropdown(
            choices=field_choices("lora.init"), value=defaults["lora.init"], label="Init",
            info="how the adapter starts; pissa and olora start from the base weights' structure (LoRA only)")
    fields["lora.init_from"] = gr.Textbox(
        value=defaults["lora.init_from"], label="Continue from LoRA file",
        info="optional: a LoRA .safetensors to continue training from (same type, rank and targets)")
    with gr.Row(equal_height=True):
        fields["lora.targets"] = gr.Dropdown(
            choices=target_choices(defaults["model.family"]), value=defaults["lora.targets"], allow_custom_value=True,
            label="Target modules", scale=3,
            info="a preset of the model family (all: every Linear in the transformer blocks), or type a regex "
                 "matching whole module names")
        count = gr.Button("Count target modules", scale=1)
    counts = gr.Markdown()
    gr.Markdown("### Attention")
    fields["advanced.attention"] = gr.Dropdown(
        choices=field_choices("advanced.attention"), value=defaults["advanced.attention"], label="Attention kernel",
        info=attention_info(defaults["train.mixed_precision"], defaults["model.base_precision"]))
    return count, counts


def _evaluation_and_sampling(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("### Evaluation loss")
    fields["train.eval_every_steps"] = gr.Number(
        value=defaults["train.eval_every_steps"], precision=0, label="Evaluate every N steps",
        info="loss on the held-out images (Dataset tab: evaluation hold-out) at fixed noise, plotted in the Run "
             "tab; 0: off")

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
        fields["sample.resolution"] = gr.Textbox(
            value=defaults["sample.resolution"], label="Sample resolution (px)",
            placeholder=sample_resolution_placeholder(defaults["model.family"], defaults["model.flavour"]),
            info="the samples' side in pixels (64-4096); empty: the flavour's default")
    with gr.Row():
        fields["sample.use_ema"] = gr.Checkbox(
            value=defaults["sample.use_ema"], label="Sample with the EMA weights",
            interactive=bool(str(defaults["train.ema_decay"]).strip()),
            info=ema_sample_info(defaults["train.ema_decay"]))
        fields["sample.clip_score_model"] = gr.Textbox(
            value=defaults["sample.clip_score_model"], label="CLIP score model", scale=2,
            placeholder="empty: off; e.g. openai/clip-vit-large-patch14",
            info="a transformers CLIP model (hub id or local folder) scoring each validation's samples against their "
                 "prompts, plotted beside the evaluation loss; loaded on the GPU after sampling and freed after")
    with gr.Row():
        fields["sample.preview_every"] = gr.Number(
            value=defaults["sample.preview_every"], precision=0, label="Live preview every N sampling steps",
            info="the Run tab shows each sample as it renders, decoded small; 0: off")
        fields["sample.preview_decoder"] = gr.Textbox(
            value=defaults["sample.preview_decoder"], label="Preview decoder", scale=2,
            placeholder="empty: the model's own VAE at reduced size",
            info="optional: a diffusers tiny autoencoder (hub id or folder) for faster previews, e.g. "
                 "madebyollin/taef1 for FLUX.1")


def ema_sample_info(ema_decay: Any) -> str:  # noqa: ANN401 - the decay box's text
    if str(ema_decay if ema_decay is not None else "").strip():
        return "render the samples with the EMA of the LoRA weights instead of the weights as trained"
    return "needs an EMA: set the EMA decay (Training tab) first"


def _connect(fields: dict[str, gr.components.Component], count: gr.Button, counts: gr.Markdown) -> None:
    """What follows the family, the flavour, the guidance mode, the timestep sampling, the precisions and the EMA,
    and the Count button."""
    _connect_settings(fields)
    def guidance_controls(mode: str, family: str, flavour: str) -> tuple[Any, Any, Any, Any]:
        """The mode menu and the controls its mode reads are editable; none of them for a flavour without a
        guidance embedding, which says why."""
        embedded = takes_guidance(family, flavour)
        value_on, range_on = guidance_interactivity(mode, embedded)
        return (gr.update(interactive=embedded, info=guidance_mode_info(family, flavour)),
                gr.update(interactive=value_on), gr.update(interactive=range_on), gr.update(interactive=range_on))

    gr.on([fields["advanced.guidance_mode"].change, fields["model.family"].change, fields["model.flavour"].change],
          guidance_controls, [fields["advanced.guidance_mode"], fields["model.family"], fields["model.flavour"]],
          [fields["advanced.guidance_mode"], fields["advanced.guidance_value"], fields["advanced.guidance_min"],
           fields["advanced.guidance_max"]], api_visibility="private", show_progress="hidden")

    def family_change(family: str, targets: str) -> Any:  # noqa: ANN401 - a gradio update
        """The family's presets as choices; another family's preset falls back to 'all', a regex stays."""
        return gr.update(choices=target_choices(family), value=targets_for_family(family, targets))

    fields["model.family"].change(family_change, [fields["model.family"], fields["lora.targets"]],
                                  fields["lora.targets"], api_visibility="private", show_progress="hidden")

    def count_targets(family: str, flavour: str, targets: str) -> str:
        """Markdown table: how many modules each target preset hits on the chosen flavour (a few seconds the
        first time: it builds the transformer without weights)."""
        return target_counts(family, flavour, targets)

    count.click(count_targets, [fields["model.family"], fields["model.flavour"], fields["lora.targets"]], counts,
                api_name="count_targets")


def _connect_settings(fields: dict[str, gr.components.Component]) -> None:
    """Mode scale follows the timestep sampling, the attention help the job's compute precision, sampling with the
    EMA the EMA decay, the sample resolution's placeholder the flavour."""
    def mode_scale(sampling: str) -> Any:  # noqa: ANN401 - a gradio update
        return gr.update(interactive=sampling == "mode", info=mode_scale_info(sampling))

    fields["advanced.timestep_sampling"].change(mode_scale, fields["advanced.timestep_sampling"],
                                                fields["advanced.mode_scale"], api_visibility="private",
                                                show_progress="hidden")

    def attention_help(mixed_precision: str, base_precision: str) -> Any:  # noqa: ANN401 - a gradio update
        return gr.update(info=attention_info(mixed_precision, base_precision))

    gr.on([fields["train.mixed_precision"].change, fields["model.base_precision"].change], attention_help,
          [fields["train.mixed_precision"], fields["model.base_precision"]], fields["advanced.attention"],
          api_visibility="private", show_progress="hidden")

    def use_ema(decay: Any) -> Any:  # noqa: ANN401 - a gradio update
        return gr.update(interactive=bool(str(decay if decay is not None else "").strip()), info=ema_sample_info(decay))

    fields["train.ema_decay"].change(use_ema, fields["train.ema_decay"], fields["sample.use_ema"],
                                     api_visibility="private", show_progress="hidden")

    def resolution_hint(family: str, flavour: str) -> Any:  # noqa: ANN401 - a gradio update
        return gr.update(placeholder=sample_resolution_placeholder(family, flavour))

    gr.on([fields["model.family"].change, fields["model.flavour"].change], resolution_hint,
          [fields["model.family"], fields["model.flavour"]], fields["sample.resolution"], api_visibility="private",
          show_progress="hidden")
