"""Run tab: start and stop, live progress, loss plot, samples and log; save and load the job as TOML."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ui import allowed_paths, form
from ui.run_state import RunView
from ui.studio import Outcome, Studio

LOSS_COLUMNS = ["step", "loss", "series"]

# Keep the log scrolled to its newest line unless the user scrolled up to read (gradio's autoscroll fires once).
FOLLOW_LOG_JS = """() => {
  const box = document.querySelector('#studio-log textarea');
  if (!box) return;
  const seen = Number(box.dataset.seenHeight || 0);
  if (box.scrollTop + box.clientHeight >= seen - 8) box.scrollTop = box.scrollHeight;
  box.dataset.seenHeight = box.scrollHeight;
}"""


def progress_html(view: RunView) -> str:
    percent = round(100 * view.progress_fraction(), 1)
    colour = {"failed": "#dc2626", "stopped": "#d97706", "completed": "#16a34a"}.get(view.status, "#f97316")
    return (
        '<div style="display:flex;flex-direction:column;gap:6px">'
        '<div style="height:14px;border-radius:7px;background:var(--neutral-200,#e5e7eb);overflow:hidden">'
        f'<div style="height:100%;width:{percent}%;background:{colour};transition:width .4s"></div></div>'
        f"<div>{html.escape(view.progress_line())}</div></div>"
    )


def loss_frame(view: RunView) -> Any:  # noqa: ANN401 - a pandas DataFrame; pandas is imported by gradio anyway
    import pandas as pd

    # Typed columns even when empty: the plot takes its axis types from the dtypes (object would be nominal).
    frame = pd.DataFrame(view.loss_rows(), columns=LOSS_COLUMNS)
    return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


def gallery_items(view: RunView, roots: list[str]) -> list[tuple[Any, str]]:
    """Sample files the app may serve go by path; one saved elsewhere is loaded and sent as an image."""
    items: list[tuple[Any, str]] = []
    for path, label in view.gallery():
        resolved = Path(path).resolve()
        if any(resolved.is_relative_to(root) for root in roots):
            items.append((str(resolved), label))
        elif resolved.is_file():
            from PIL import Image

            with Image.open(resolved) as image:
                items.append((image.copy(), label))
    return items


def problems_update(outcome: Outcome) -> Any:  # noqa: ANN401 - a gradio update
    if outcome.ok:
        return gr.update(visible=False, value="")
    for problem in outcome.problems[:3]:
        gr.Warning(problem)
    return gr.update(visible=True, value="\n".join(outcome.problems))


def build(fields: dict[str, gr.components.Component], studio: Studio, base: gr.State,
          flavour_choices: Callable[[str], list[tuple[str, str]]]) -> None:
    """The Run tab; `base` holds the fields of a loaded job that the form has no control for."""
    with gr.Row():
        start = gr.Button("Start", variant="primary")
        stop = gr.Button("Stop", variant="stop")
    status = gr.Textbox(value=studio.view.status_text(), label="Status", interactive=False)
    problems = gr.Textbox(label="Problems", visible=False, interactive=False, lines=3)
    progress = gr.HTML(progress_html(studio.view), label="Progress")
    with gr.Row():
        plot = gr.LinePlot(loss_frame(studio.view), x="step", y="loss", color="series", title="Loss", label="Loss",
                           height=300, scale=1)
        gallery = gr.Gallery(label="Samples", columns=3, height=300, scale=1, object_fit="contain")
    log = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, elem_id="studio-log")
    log.change(None, js=FOLLOW_LOG_JS, api_visibility="private", show_progress="hidden")
    with gr.Row():
        save = gr.Button("Save job as TOML")
        load = gr.UploadButton("Load job TOML", file_types=[".toml"], type="filepath")
    job_file = gr.File(label="Job file", visible=False, interactive=False)
    seen = gr.State({})  # per browser session: what it was last sent, so unchanged plots are not re-sent
    roots = allowed_paths(studio.workdir)

    # ---------------------------------------------------------------- start, stop, poll

    def start_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Validate the form and start training it; with every value left at its default this trains the demo."""
        outcome = studio.start(values, values.pop("base", None))
        return outcome.message, problems_update(outcome)

    start.click(form.keyword_handler(start_run, extra=("base",)),
                inputs_kwargs={**{form.api_name(k): fields[k] for k in form.FORM_KEYS}, "base": base},
                outputs=[status, problems], api_name="start", concurrency_limit=1)

    def stop_run() -> str:
        """Ask the run to end after the current step; it saves the LoRA."""
        return studio.stop()

    stop.click(stop_run, None, status, api_name="stop")

    def poll(last: dict[str, int]) -> tuple[Any, ...]:
        """Status line first ('idle', 'running: step 12/40', 'completed: LoRA saved to …', 'failed: …')."""
        view = studio.poll()
        with view.lock:
            key = {"run": view.run_id, "losses": len(view.losses), "samples": len(view.samples),
                   "log": view.version, "status": view.status}
            fresh = last.get("run") != key["run"]
            plot_value = loss_frame(view) if fresh or last.get("losses") != key["losses"] else gr.skip()
            gallery_value = (gallery_items(view, roots) if fresh or last.get("samples") != key["samples"]
                             else gr.skip())
            log_value = view.log_text() if fresh or last.get("log") != key["log"] else gr.skip()
            # A start's problems stay up until the run they were about moves on (e.g. "already in progress").
            moved_on = bool(last) and last.get("status") != view.status
            problems_value = gr.update(visible=False, value="") if moved_on else gr.skip()
            return (view.status_text(), progress_html(view), plot_value, gallery_value, log_value, problems_value,
                    key)

    timer = gr.Timer(1.0)
    timer.tick(poll, seen, [status, progress, plot, gallery, log, problems, seen], api_name="poll",
               show_progress="hidden", concurrency_limit=None)

    # ---------------------------------------------------------------- jobs as TOML

    def save_job(by_component: dict[gr.components.Component, Any]) -> tuple[Any, str, Any]:
        path, outcome = studio.save_job(form.values_by_key(fields, by_component), by_component[base])
        file_update = gr.update(value=str(path), visible=True) if path else gr.update()
        return file_update, outcome.message, problems_update(outcome)

    save.click(save_job, {*fields.values(), base}, [job_file, status, problems], api_visibility="private")

    form_outputs = list(fields.values())

    def load_job(path: str | None) -> dict[gr.components.Component, Any]:
        if not path:
            return {}
        values, hidden, outcome = studio.load_job(path)
        updates: dict[gr.components.Component, Any] = {status: outcome.message, problems: problems_update(outcome)}
        if values is None:
            return updates
        for key, component in fields.items():
            updates[component] = values[key]
        updates[fields["model.flavour"]] = gr.update(choices=flavour_choices(values["model.family"]),
                                                     value=values["model.flavour"])
        updates[base] = hidden
        gr.Info(outcome.message)
        for note in outcome.notes:
            gr.Warning(note)
        return updates

    load.upload(load_job, load, [*form_outputs, base, status, problems], api_visibility="private")
