"""Model tab: a hardware profile and a training preset that fill the form, then family, flavour, where the
weights come from, and their precision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from trainer import registry
from ui import form, model_files, presets
from ui.form import field_choices
from ui.memory import swap_bound
from ui.model_info import flavour_summary
from ui.studio import Studio


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
    return presets.suggested_source(studio.demo_dir, family, flavour, current)


def form_updates(fields: dict[str, gr.components.Component], values: dict[str, Any]) -> dict[Any, Any]:
    """Component → update showing `values` (a loaded job, a filled preset): the menus whose choices depend on the
    model (flavours, LoRA targets) and the swap slider's bound follow it in the same update."""
    updates: dict[Any, Any] = {fields[key]: values[key] for key in fields}
    family, flavour = values["model.family"], values["model.flavour"]
    updates[fields["model.flavour"]] = gr.update(choices=flavour_choices(family), value=flavour)
    updates[fields["lora.targets"]] = gr.update(choices=form.target_choices(family), value=values["lora.targets"])
    # limits and value in one update; a value beyond the flavour's bound is clamped, and one notice says so
    most, value = swap_bound(family, flavour, values["lowvram.blocks_to_swap"])
    if value != values["lowvram.blocks_to_swap"] and values.get("lowvram.override_blocks_to_swap", True):
        gr.Warning(f"Blocks to swap (Low VRAM): {values['lowvram.blocks_to_swap']} is more than this flavour "
                   f"has; set to its {most} (lowvram.blocks_to_swap)")
    updates[fields["lowvram.blocks_to_swap"]] = gr.update(maximum=most, value=value)
    return updates


TEXT_ENCODER_INFO = ("auto: bf16, or int8 when the first run would not fit this machine's RAM (the RAM verdict "
                     "says which); int8 keeps the embeddings closest to bf16's at half the size; a FLUX.1 job's "
                     "T5-XXL and CLIP-L alike")
MODULATION_INFO = ("FLUX.1's AdaLN modulation Linears (27% of the transformer): auto = the base's format for fp8/int8, "
                   "int8 for int4/nf4; bf16 keeps them unquantised")


def modulation_info(family: str, base_precision: str) -> str:
    """The modulation menu's help, or why it is greyed out."""
    if family != "flux1":
        return "FLUX.1 only: FLUX.2's modulation sits outside the blocks and is never quantised"
    if not form.modulation_applies(family, base_precision):
        return f"only with a quantised base precision (fp8, int8, int4, nf4); a {base_precision} base keeps it in " \
               f"{base_precision}"
    return MODULATION_INFO


def _connect_modulation(fields: dict[str, gr.components.Component]) -> None:
    """The modulation menu is editable only where it is read, and says why not."""
    def modulation_menu(family: str, base_precision: str) -> Any:  # noqa: ANN401 - a gradio update
        return gr.update(interactive=form.modulation_applies(family, base_precision),
                         info=modulation_info(family, base_precision))

    gr.on([fields["model.family"].change, fields["model.base_precision"].change], modulation_menu,
          [fields["model.family"], fields["model.base_precision"]], fields["model.modulation_precision"],
          api_visibility="private", show_progress="hidden")


def preset_menu(profile: str | None, family: str, flavour: str) -> Any:  # noqa: ANN401 - a gradio update
    """The flavour's presets, the profile's suggestion selected (none when it suggests none)."""
    choices = presets.preset_choices(family, flavour)
    return gr.update(choices=choices, value=presets.suggested_preset(profile, family, flavour),
                     info=("a partial job for this flavour and a VRAM tier, every trade-off commented in presets/"
                           if choices else "no presets for this flavour"))


class SingleFiles:
    """The "Single files (ComfyUI)" accordion's handlers: `rescan` fills the slot menus, `check` refuses a chosen
    file outside the allowed folders; both write the accordion's message line."""

    def __init__(self, fields: dict[str, gr.components.Component], studio: Studio, message: gr.Markdown) -> None:
        self.fields, self.studio, self.message = fields, studio, message
        self.menus = [fields[key] for key in model_files.SLOT_KEYS.values()]
        self.outputs = [*self.menus, message]

    def rescan(self, models_dir: str | None, family: str, flavour: str) -> list[Any]:
        result = model_files.scan(self.studio.folders, models_dir, family, flavour)
        updates = []
        for slot, key in model_files.SLOT_KEYS.items():
            visible = model_files.slot_visible(family, slot)
            # no value: a chosen or loaded path stays (allow_custom_value), except a hidden slot, which the spec
            # refuses when set (FLUX.2 has no text_encoder_2)
            extra = {} if visible else {"value": ""}
            updates.append(gr.update(choices=result.choices[key], visible=visible, **extra))
        return [*updates, result.message if result.ok else f"**{result.message}**"]

    def check(self, *paths: str | None) -> str:
        chosen = dict(zip(model_files.SLOT_KEYS.values(), paths, strict=True))
        problems = model_files.refused_files(self.studio.folders, chosen)
        return "\n".join(f"**{problem}**" for problem in problems)


def single_files(fields: dict[str, gr.components.Component], defaults: dict[str, Any], studio: Studio) -> SingleFiles:
    """The accordion: ComfyUI's models folder with a Scan button, and one menu per single-file slot (empty = the
    component comes from model.source). Typed paths are kept: a file outside the folder can still be given."""
    family, flavour = defaults["model.family"], defaults["model.flavour"]
    with gr.Accordion("Single files (ComfyUI)", open=False):
        with gr.Row(equal_height=True):
            fields[model_files.FOLDER_KEY] = gr.Textbox(
                value=defaults[model_files.FOLDER_KEY], label="ComfyUI models folder", scale=4,
                placeholder="ComfyUI's models/ folder (or its install folder)",
                info="its diffusion_models, unet, vae, text_encoders, clip and checkpoints files fill the menus below")
            scan = gr.Button("Scan", scale=1)
        initial = model_files.scan(studio.folders, defaults[model_files.FOLDER_KEY], family, flavour)
        for slot, key in model_files.SLOT_KEYS.items():
            fields[key] = gr.Dropdown(
                choices=initial.choices[key], value=defaults[key], label=key, allow_custom_value=True,
                visible=model_files.slot_visible(family, slot),
                info="a .safetensors file replacing this component's weights; empty: from model.source")
        message = gr.Markdown("")
    handlers = SingleFiles(fields, studio, message)
    scan.click(handlers.rescan, [fields[model_files.FOLDER_KEY], fields["model.family"], fields["model.flavour"]],
               handlers.outputs, api_visibility="private")
    gr.on([menu.input for menu in handlers.menus], handlers.check, handlers.menus, message,
          api_visibility="private", show_progress="hidden")
    return handlers


def _connect_model(fields: dict[str, gr.components.Component], studio: Studio, summary: gr.Markdown,
                   note: gr.Markdown, slots: SingleFiles, profile: gr.Dropdown, preset: gr.Dropdown) -> None:
    """What follows the family and flavour: the flavour menu, the source, the summary, the presets, the single-file
    menus."""
    def describe(current_family: str, current_flavour: str) -> tuple[str, str]:
        return flavour_summary(current_family, current_flavour), source_note(studio, current_family, current_flavour)

    model = [fields["model.family"], fields["model.flavour"], fields["model.source"]]
    gr.on([fields["model.family"].change, fields["model.flavour"].change], describe, model[:2], [summary, note],
          api_visibility="private", show_progress="hidden")

    gr.on([fields["model.family"].change, fields["model.flavour"].change, profile.change], preset_menu,
          [profile, fields["model.family"], fields["model.flavour"]], preset, api_visibility="private",
          show_progress="hidden")

    # Fits depend on the flavour: the menus follow it (a cheap header scan, cached), and text_encoder_2 shows for
    # FLUX.1 only. .change, so a loaded job's family hides or shows it too.
    gr.on([fields["model.family"].change, fields["model.flavour"].change], slots.rescan,
          [fields[model_files.FOLDER_KEY], *model[:2]], slots.outputs, api_visibility="private",
          show_progress="hidden")


def _connect_flavour_choice(fields: dict[str, gr.components.Component], studio: Studio,
                            applied: gr.Markdown) -> None:
    """The user's choice of family or flavour (.input, not .change: a loaded job sets family, flavour and source
    together): the source suggested for it, and leaving the demo replaces the demo's own values in later tabs
    (fp32, 64 px, its learning rate, dataset, trigger and prompts) and says which."""
    def flavour_input(current_family: str, new_flavour: str, source: str, *demo_only: Any) -> list[Any]:  # noqa: ANN401
        values = dict(zip(presets.DEMO_ONLY, demo_only, strict=True))
        changes, notice = presets.leave_demo(values, current_family, new_flavour, studio.demo_dir)
        if notice:
            gr.Info(notice)
        return [gr.skip(), suggested_source(studio, current_family, new_flavour, source),
                *[changes[key] if key in changes else gr.skip() for key in presets.DEMO_ONLY],
                notice if notice else gr.skip()]

    def family_input(new_family: str, current_flavour: str, source: str, *demo_only: Any) -> list[Any]:  # noqa: ANN401
        names = registry.flavour_names(new_family)
        new_flavour = current_flavour if current_flavour in names else names[0]
        return [gr.update(choices=flavour_choices(new_family), value=new_flavour),
                *flavour_input(new_family, new_flavour, source, *demo_only)[1:]]

    model = [fields["model.family"], fields["model.flavour"], fields["model.source"]]
    demo_only = [fields[key] for key in presets.DEMO_ONLY]
    chosen = [fields["model.flavour"], fields["model.source"], *demo_only, applied]
    fields["model.family"].input(family_input, [*model, *demo_only], chosen, api_visibility="private")
    fields["model.flavour"].input(flavour_input, [*model, *demo_only], chosen, api_visibility="private")


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any], studio: Studio,
          menus: dict[str, gr.components.Component] | None = None) -> Callable[[gr.State, gr.State], None]:
    """The tab's controls; returns `connect(base, baseline)`, to call once every tab's fields exist (applying a
    preset fills the whole form). `baseline` holds the form's last fill: what differs from it are the user's
    edits, which a preset never overrides. `menus` receives the profile menu (key "profile"), which the Quick
    start sets to the GPU it filled the form for."""
    family, flavour = defaults["model.family"], defaults["model.flavour"]
    profile_name = presets.default_profile()
    with gr.Row(equal_height=True):
        profile = gr.Dropdown(
            choices=presets.profile_choices(), value=profile_name, label="Hardware profile", scale=2,
            info="your GPU (the detected one is preselected): sets the GPU memory to plan for and suggests a "
                 "preset")
        preset = gr.Dropdown(
            choices=presets.preset_choices(family, flavour), label="Preset", scale=3,
            value=presets.suggested_preset(profile_name, family, flavour),
            info="a partial job for this flavour and a VRAM tier, every trade-off commented in presets/")
        apply = gr.Button("Apply profile and preset", scale=1)
    if menus is not None:
        menus["profile"] = profile
    applied = gr.Markdown("")
    with gr.Row():
        fields["model.family"] = gr.Dropdown(
            choices=[(f.label, name) for name, f in registry.FAMILIES.items()], value=family, label="Family")
        fields["model.flavour"] = gr.Dropdown(
            choices=flavour_choices(family), value=flavour, label="Flavour")
    summary = gr.Markdown(flavour_summary(family, flavour))
    fields["model.source"] = gr.Textbox(
        value=defaults["model.source"], label="Source", placeholder="hub id (owner/name) or a diffusers folder")
    note = gr.Markdown(source_note(studio, family, flavour))
    slots = single_files(fields, defaults, studio)
    precisions = field_choices("model.base_precision")
    with gr.Row():
        fields["model.base_precision"] = gr.Dropdown(
            choices=precisions, value=defaults["model.base_precision"], label="Base model precision",
            info="storage of the frozen transformer: bf16/fp16 as trained; fp8, int8, int4, nf4 quantised "
                 "(less VRAM, computed in bf16)")
        fields["model.text_encoder_precision"] = gr.Dropdown(
            choices=field_choices("model.text_encoder_precision"), value=defaults["model.text_encoder_precision"],
            label="Text encoder precision", info=TEXT_ENCODER_INFO)
        applies = form.modulation_applies(family, defaults["model.base_precision"])
        fields["model.modulation_precision"] = gr.Dropdown(
            choices=field_choices("model.modulation_precision"), value=defaults["model.modulation_precision"],
            label="Modulation precision", interactive=applies,
            info=modulation_info(family, defaults["model.base_precision"]))

    _connect_model(fields, studio, summary, note, slots, profile, preset)
    _connect_modulation(fields)

    def connect(base: gr.State, baseline: gr.State) -> None:
        _connect_flavour_choice(fields, studio, applied)  # here: leaving the demo changes fields of later tabs
        def apply_profile_and_preset(by_component: dict[Any, Any]) -> dict[Any, Any]:
            values = form.values_by_key(fields, by_component)
            filled = presets.fill(values, by_component[base], by_component[baseline], by_component[profile],
                                  by_component[preset], studio.demo_dir)
            if not filled.ok:
                return {applied: f"**{filled.message}:**\n" + "\n".join(f"- {p}" for p in filled.problems)}
            gr.Info(filled.message)
            return {**form_updates(fields, filled.values), base: filled.hidden, baseline: filled.baseline,
                    applied: filled.message}

        apply.click(apply_profile_and_preset, {*fields.values(), base, baseline, profile, preset},
                    [*fields.values(), base, baseline, applied], api_visibility="private")

    return connect
