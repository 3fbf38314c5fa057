"""Quick start, the first tab: the GPU, the model for it, the images (uploaded or a folder), a trigger word, a LoRA
name and Start. Start fills the whole form (every tab shows what it set), starts the run and opens the Run tab.
The choices and the fill are ui/quickstart.py's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from trainer.spec import SpecError
from ui import form, quickstart, upload_area
from ui.lowvram_tab import VERDICT_CSS, VERDICT_HTML
from ui.studio import Studio
from ui.uploads import DATASETS_DIR

DEFAULT_NAME = "my_first_lora"
RUN_TAB = "run"  # the id of the Run tab in ui/page.py


def verdict(studio: Studio, gpu: str, images: str, trigger: str, name: str) -> str:
    """The estimator's line for the job Start would run, or what is missing."""
    choice = quickstart.choose(gpu)
    # The estimate needs no images: before any are given it is made for a folder of them, and Start asks for them.
    images = images or ("" if choice.is_demo else str(studio.workdir / DATASETS_DIR / "images"))
    filled = quickstart.fill(choice, studio.workdir, studio.demo_dir, images, trigger, name)
    if not filled.ok:
        return "problems — " + "; ".join(filled.problems)
    try:
        spec = form.form_to_spec(filled.values, filled.hidden)
    except SpecError as exc:
        return "problems — " + "; ".join(exc.problems)
    return quickstart.verdict_line(spec, choice, quickstart.machine_ram_gib())


def build(studio: Studio) -> Callable[..., None]:
    """The tab's controls; returns `connect(fields, base, baseline, tabs, form_updates, profile)`, to call once every
    tab's fields exist (Start fills them all, and sets the Model tab's profile menu to the GPU chosen)."""
    gr.Markdown("### Your first LoRA\nChoose the GPU, bring the images, name it, Start. Every setting it makes is "
                "on the other tabs afterwards, to see and change.")
    gpu_name = quickstart.default_gpu()
    with gr.Row(equal_height=True):
        gpu = gr.Dropdown(choices=quickstart.gpu_choices(), value=gpu_name, label="GPU", scale=2,
                          info="the detected one is chosen; the model and its settings follow it")
        model = gr.Markdown(quickstart.model_words(quickstart.choose(gpu_name), quickstart.gpu_found()),
                            elem_id="quick-model")
    gr.Markdown("#### Images")
    area = upload_area.build(studio, "quick-upload")
    images = gr.Textbox("", label="Image folder", elem_id="quick-images",
                        placeholder="filled by an upload; or the path of a folder of images on this machine (empty "
                                    "with the demo: its own images)")
    with gr.Row():
        trigger = gr.Textbox("", label="Trigger word", placeholder="a rare word, e.g. ohwx",
                             info="put in front of every caption; use it in prompts to call up what the LoRA learnt")
        name = gr.Textbox(DEFAULT_NAME, label="LoRA name", info="the file's name and its folder under output/")
    line = gr.HTML(verdict(studio, gpu_name, "", "", DEFAULT_NAME), html_template=VERDICT_HTML,
                   css_template=VERDICT_CSS, label="Verdict", elem_id="quick-verdict")
    start = gr.Button("Start", variant="primary", size="lg", elem_id="quick-start")
    message = gr.Markdown("", elem_id="quick-message")

    gpu.change(lambda chosen: quickstart.model_words(quickstart.choose(chosen), quickstart.gpu_found()), gpu, model,
               api_visibility="private", show_progress="hidden")
    gr.on([gpu.change, images.change, trigger.change, name.change], lambda *args: verdict(studio, *args),
          [gpu, images, trigger, name], line, api_visibility="private", show_progress="hidden")

    def connect(fields: dict[str, gr.components.Component], base: gr.State, baseline: gr.State, tabs: gr.Tabs,
                form_updates: Callable[[dict[str, Any], dict[str, Any]], dict[Any, Any]],
                profile: gr.Dropdown) -> None:
        # the caption editor and the captioner read the form's image folder: an upload here sets it too
        upload_area.connect(area, studio, [images, fields["dataset.path"]])

        def quick_start(chosen: str, folder: str, word: str, lora: str) -> dict[Any, Any]:
            """Fill the form for this GPU, model, images, trigger and name, start it, open the Run tab."""
            filled = quickstart.fill(quickstart.choose(chosen), studio.workdir, studio.demo_dir, folder, word, lora)
            if not filled.ok:
                for problem in filled.problems[:3]:
                    gr.Warning(problem)
                return {message: "**Not started:** " + "; ".join(filled.problems)}
            outcome = studio.start(filled.values, filled.hidden)
            if not outcome.ok:
                for problem in outcome.problems[:3]:
                    gr.Warning(problem)
                return {message: f"**{outcome.message}**\n" + "\n".join(f"- {p}" for p in outcome.problems)}
            return {**form_updates(fields, filled.values), base: filled.hidden, baseline: filled.baseline,
                    profile: chosen, message: f"{outcome.message}; the Run tab follows it",
                    tabs: gr.Tabs(selected=RUN_TAB)}

        start.click(quick_start, [gpu, images, trigger, name],
                    [*fields.values(), base, baseline, profile, message, tabs],
                    api_name="quick_start", concurrency_limit=1)

    return connect
