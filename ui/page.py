"""The whole page: every tab built around one runner, and the wiring between the tabs. Gradio is imported by
`build_app`, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio as gr

    from trainer.runners.process import ProcessRunner
    from trainer.runners.thread import TrainingRunner
    from ui.upload_limits import UploadLimits

TITLE = "Flux LoRA Studio"
# Toasts at the bottom right: at the top they covered the job bar's buttons (gradio 6 takes css in launch()).
# A sample's whole label (step and prompt) under its picture (not over it), not cut to one line; the picture square.
APP_CSS = """.toast-wrap { top: auto !important; bottom: var(--size-4); }
#run-samples .caption, #run-samples .caption-label { white-space: normal !important; text-overflow: clip !important;
  overflow: visible !important; max-width: none !important; }
#run-samples .thumbnail-item { aspect-ratio: auto !important; height: auto !important; display: flex;
  flex-direction: column; }
#run-samples .thumbnail-item img { aspect-ratio: 1 / 1; height: auto !important; }
#run-samples .caption-label { position: static !important; border: none !important; border-radius: 0 !important; }"""
# Gradio keeps every file a page uploads (datasets, job files) in its temp folder until the app stops, unless told to
# delete them: every `frequency` seconds, the ones older than `age` (the app copies what it keeps at once).
UPLOADS_KEPT_S = (600, 3600)


def build_app(runner: ProcessRunner | TrainingRunner, workdir: Path, allowed: Iterable[str | Path] = (),
              upload_limits: UploadLimits | None = None) -> gr.Blocks:
    """The whole UI around one runner; every default comes from the demo job, so Start trains the demo. Paths the
    users type are used only inside the workdir and the `allowed` folders; uploads keep to `upload_limits`."""
    import gradio as gr

    from trainer.runners.app import AppRunner
    from ui import (
        advanced_tab,
        dataset_tab,
        estimator_tab,
        history_tab,
        job_bar,
        lowvram_tab,
        model_tab,
        quickstart_tab,
        run_tab,
        training_tab,
        words,
    )
    from ui.form import FORM_KEYS
    from ui.memory import detected_vram_gib
    from ui.studio import Studio

    # one training at a time, here or in processes
    studio = Studio(AppRunner.of(runner), Path(workdir), allowed, upload_limits)
    defaults = studio.default_values()
    detected = detected_vram_gib()
    fields: dict[str, gr.components.Component] = {}
    menus: dict[str, gr.components.Component] = {}  # the Model tab's profile menu, which the Quick start sets
    with gr.Blocks(title=TITLE, delete_cache=UPLOADS_KEPT_S) as app:
        gr.Markdown(f"## {TITLE}")
        base = gr.State({})  # fields of a loaded job that the form has no control for
        baseline = gr.State(defaults)  # the form's last fill: what differs from it are the user's edits
        connect_job_bar = job_bar.build(studio)
        with gr.Tabs() as tabs:
            with gr.Tab("Quick start", id="quick"):
                connect_quickstart = quickstart_tab.build(studio)
            with gr.Tab("Model"):
                connect_model = model_tab.build(fields, defaults, studio, menus)
            with gr.Tab("Dataset & Captioning"):
                connect_dataset = dataset_tab.build(fields, defaults, studio, base)
            with gr.Tab("Low VRAM"):
                connect_lowvram = lowvram_tab.build(fields, defaults, detected)
            with gr.Tab("Training"):
                training_tab.build(fields, defaults)
            with gr.Tab("Advanced"):
                advanced_tab.build(fields, defaults)
            with gr.Tab("Memory Estimator") as estimator:
                estimator_tab.build(fields, defaults, base, detected, estimator)
            with gr.Tab("Run", id=quickstart_tab.RUN_TAB):
                run_tab.build(fields, studio, base, app)
            with gr.Tab("Runs", id="runs") as runs:
                connect_history = history_tab.build(studio)
        missing = set(FORM_KEYS) - set(fields)
        if missing:
            raise RuntimeError(f"form keys without a control: {sorted(missing)}")
        studio.labels.update(words.labels_of(fields))  # its messages name the fields as the page shows them
        words.check_as_typed(fields, defaults)
        connect_dataset()  # the dataset check reads the Training tab's batch size
        connect_lowvram(base, app)  # the live verdict reads the whole job
        connect_model(base, baseline)  # a preset fills the whole form
        connect_job_bar(fields, base, baseline, defaults, model_tab.form_updates, app)  # a job fills every tab
        connect_quickstart(fields, base, baseline, tabs, model_tab.form_updates, menus["profile"])  # fills every tab
        connect_history(fields, base, baseline, tabs, model_tab.form_updates, runs)  # so does Resume

        def placeholders(family: str, flavour: str) -> tuple[object, object]:
            steps, guidance = advanced_tab.sample_placeholders(family, flavour)
            return gr.update(placeholder=steps), gr.update(placeholder=guidance)

        gr.on([fields["model.family"].change, fields["model.flavour"].change], placeholders,
              [fields["model.family"], fields["model.flavour"]], [fields["sample.steps"], fields["sample.guidance"]],
              api_visibility="private", show_progress="hidden")
    app.run_publisher = studio.publisher  # served by serve_run_state once the app is launched
    return app


def serve_run_state(app: gr.Blocks) -> None:
    """On the launched app, the route the Run tab's pages poll (ui/run_route.py), behind the page's login."""
    from ui.run_route import add_run_route

    add_run_route(app.server_app, app.run_publisher)
