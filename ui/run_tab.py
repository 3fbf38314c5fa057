"""Run tab: drive a session (start, train N steps, validate, save, stop, end), resume an interrupted run; live
progress, loss plot, samples and log. The view is the app's, not the browser's: every browser sees the one run,
whoever started it, and a second Start is refused while it goes on."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ui import form, multi_gpu
from ui.feedback import problems_update
from ui.gauges import gauges_html, read_gauges
from ui.paths import Folders
from ui.run_state import RunView
from ui.served import allowed_paths
from ui.studio import Studio

LOSS_COLUMNS = ["step", "loss", "series"]
LOSS_COLOURS = {"loss": "#93c5fd", "smoothed": "#1d4ed8", "eval": "#16a34a"}  # the series of RunView.loss_rows

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
    colour = {"failed": "#dc2626", "stopped": "#d97706", "completed": "#16a34a", "paused": "#2563eb"}.get(
        view.status, "#f97316")
    return (
        '<div style="display:flex;flex-direction:column;gap:6px">'
        '<div style="height:14px;border-radius:7px;background:var(--neutral-200,#e5e7eb);overflow:hidden">'
        f'<div style="height:100%;width:{percent}%;background:{colour};transition:width .4s"></div></div>'
        f"<div>{html.escape(view.progress_line())}</div></div>"
    )


def loss_frame(view: RunView) -> Any:  # noqa: ANN401 - a pandas DataFrame (pandas comes with gradio), or None
    """The plot's rows; None before the first step: a gradio LinePlot that once showed an empty frame with a colour
    column never draws the lines of later frames (gradio 6.31; seen in tests/test_browser.py's screenshots)."""
    import pandas as pd

    rows = view.loss_rows()
    if not rows:
        return None
    # Typed columns: the plot takes its axis types from the dtypes (object would be nominal).
    frame = pd.DataFrame(rows, columns=LOSS_COLUMNS)
    return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


def gallery_items(view: RunView, roots: list[str], folders: Folders | None = None) -> list[tuple[Any, str]]:
    """Sample files gradio serves (`roots`) go by path; one in another folder the app may use is loaded and sent
    as an image; one anywhere else is left out (a run can only have put it there through a link)."""
    items: list[tuple[Any, str]] = []
    for path, label in view.gallery():
        resolved = Path(path).resolve()
        if any(resolved.is_relative_to(root) for root in roots):
            items.append((str(resolved), label))
        elif (folders is None or folders.allows(resolved)) and resolved.is_file():
            from PIL import Image

            with Image.open(resolved) as image:
                items.append((image.copy(), label))
    return items


def offer_updates(text: str) -> tuple[str, Any]:
    """The resume offer's text (plain, for the API) and its row with the Resume button, shown only when there is
    something to resume."""
    return text, gr.update(visible=bool(text))


@dataclass
class _View:
    """The Run tab's components, built by `build` and wired by the `_connect_*` functions."""

    buttons: dict[str, gr.Button]
    steps: gr.Number
    offer: gr.Markdown
    offer_row: gr.Row
    status: gr.Textbox
    problems: gr.Textbox
    progress: gr.HTML
    memory: gr.HTML
    plot: gr.LinePlot
    gallery: gr.Gallery
    log: gr.Textbox


def build(fields: dict[str, gr.components.Component], studio: Studio, base: gr.State,
          app: gr.Blocks | None = None) -> None:
    """The Run tab; `base` holds the fields of a loaded job that the form has no control for. With `app`, the
    resume offer is also checked when the page loads."""
    view = _build_view(fields, studio, base)
    form_kwargs = {**{form.api_name(k): fields[k] for k in form.FORM_KEYS}, "base": base}
    refresh_offer = _connect_resume_offer(view, fields, studio, form_kwargs, app)
    _connect_actions(view, studio, form_kwargs, refresh_offer)
    _connect_poll(view, studio)


def _build_view(fields: dict[str, gr.components.Component], studio: Studio, base: gr.State) -> _View:
    with gr.Row():
        buttons = {"start": gr.Button("Start", variant="primary", scale=2)}
        steps = gr.Number(10, label="Steps", precision=0, minimum=1, step=1, scale=1, min_width=90)
        buttons["train"] = gr.Button("Train N steps", scale=2)
        buttons["validate"] = gr.Button("Validate now", scale=2)
        buttons["save"] = gr.Button("Save LoRA", scale=2)
        buttons["stop"] = gr.Button("Stop", variant="stop", scale=2)
        buttons["end"] = gr.Button("End training", scale=2)
    connect_multi_gpu = multi_gpu.build(fields, studio, base)  # the "Several GPUs" accordion
    with gr.Row(visible=False, equal_height=True) as offer_row:
        offer = gr.Markdown("", label="Resume offer")
        buttons["resume"] = gr.Button("Resume", variant="primary", scale=0, min_width=120)
    status = gr.Textbox(value=studio.view.status_text(), label="Status", interactive=False)
    problems = gr.Textbox(label="Problems", visible=False, interactive=False, lines=3)
    connect_multi_gpu(status, problems)
    progress = gr.HTML(progress_html(studio.view), label="Progress", elem_id="run-progress")
    memory = gr.HTML(gauges_html(read_gauges()), label="Memory", elem_id="run-memory")
    with gr.Row():
        # No fixed height: at 300 px the legend under the plot was cut off. Raw loss pale, its average strong.
        plot = gr.LinePlot(loss_frame(studio.view), x="step", y="loss", color="series", title="Loss", label="Loss",
                           color_title="", color_map=LOSS_COLOURS, scale=1, elem_id="run-loss")
        gallery = gr.Gallery(label="Samples", columns=3, height=300, scale=1, object_fit="contain",
                             elem_id="run-samples")
    log = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, elem_id="studio-log")
    log.change(None, js=FOLLOW_LOG_JS, api_visibility="private", show_progress="hidden")
    return _View(buttons, steps, offer, offer_row, status, problems, progress, memory, plot, gallery, log)


def _connect_resume_offer(view: _View, fields: dict[str, gr.components.Component], studio: Studio,
                          form_kwargs: dict[str, Any], app: gr.Blocks | None) -> Callable[[Any], None]:
    """The resume offer and its Resume button; returns `refresh_offer(event)`, which checks the offer again after
    an action that starts or ends a session."""
    offer_inputs = {"output_dir": fields["output.dir"], "train_max_steps": fields["train.max_steps"]}
    outputs = [view.offer, view.offer_row]

    def resume_offer(output_dir: str, train_max_steps: Any) -> tuple[Any, Any]:  # noqa: ANN401
        """'An interrupted run was found at step N in DIR …' when output_dir holds an unfinished run, else ''."""
        return offer_updates(studio.resume_offer(output_dir, train_max_steps))

    triggers = [fields["output.dir"].change, fields["train.max_steps"].change]
    if app is not None:
        triggers.insert(0, app.load)
    gr.on(triggers, resume_offer, inputs_kwargs=offer_inputs, outputs=outputs, api_name="resume_offer",
          show_progress="hidden")

    def refresh_offer(event: Any) -> None:  # noqa: ANN401 - a gradio Dependency
        event.then(resume_offer, inputs_kwargs=offer_inputs, outputs=outputs, api_visibility="private",
                   show_progress="hidden")

    def resume_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Start the form's job from the latest training state in its output.dir (exact resume)."""
        outcome = studio.start(values, values.pop("base", None), resume=True)
        return outcome.message, problems_update(outcome)

    refresh_offer(view.buttons["resume"].click(
        form.keyword_handler(resume_run, extra=("base",)), inputs_kwargs=form_kwargs,
        outputs=[view.status, view.problems], api_name="resume", concurrency_limit=1))
    return refresh_offer


def _connect_actions(view: _View, studio: Studio, form_kwargs: dict[str, Any],
                     refresh_offer: Callable[[Any], None]) -> None:
    """Start, Train N steps, Validate now, Save LoRA, Stop, End training."""
    buttons, answer = view.buttons, [view.status, view.problems]

    def start_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Validate the form and start training it; with every value left at its default this trains the demo."""
        outcome = studio.start(values, values.pop("base", None))
        return outcome.message, problems_update(outcome)

    refresh_offer(buttons["start"].click(form.keyword_handler(start_run, extra=("base",)), inputs_kwargs=form_kwargs,
                                         outputs=answer, api_name="start", concurrency_limit=1))

    def train_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Train `steps` more steps, then pause: on the live session, or on one set up from the form first
        (the form is ignored while a session is live)."""
        outcome = studio.train_steps(values, values.pop("steps", None), values.pop("base", None))
        for note in outcome.notes:
            gr.Warning(note)
        return outcome.message, problems_update(outcome)

    refresh_offer(buttons["train"].click(form.keyword_handler(train_run, extra=("base", "steps")),
                                         inputs_kwargs={"steps": view.steps, **form_kwargs}, outputs=answer,
                                         api_name="train_steps", concurrency_limit=1))

    def validate_now() -> tuple[str, Any]:
        """Render the sample prompts with the current LoRA: now while paused, after the current step while
        training."""
        outcome = studio.validate_now()
        return outcome.message, problems_update(outcome)

    buttons["validate"].click(validate_now, None, answer, api_name="validate_now", concurrency_limit=1)

    def save_now() -> tuple[str, Any]:
        """Save an intermediate LoRA (name-stepNNNNNN) now while paused, after the current step while training."""
        outcome = studio.save_now()
        return outcome.message, problems_update(outcome)

    buttons["save"].click(save_now, None, answer, api_name="save_now", concurrency_limit=1)

    def stop_run() -> str:
        """Stop training after the current step; the LoRA is saved. Train N steps continues a paused session."""
        text = studio.stop()
        if not text.startswith("stopping"):
            gr.Warning(text)  # the next poll rewrites the status line within a second; the toast stays to be read
        return text

    buttons["stop"].click(stop_run, None, view.status, api_name="stop")

    def end_training() -> tuple[str, Any]:
        """Save the final LoRA (if anything is unsaved), render the final samples and free the session."""
        outcome = studio.end_training()
        return outcome.message, problems_update(outcome)

    buttons["end"].click(end_training, None, answer, api_name="end_training", concurrency_limit=1)


def _connect_poll(view: _View, studio: Studio) -> None:
    """The timers: the run's status, progress, loss plot, log and samples every second; the gauges every two."""
    seen = gr.State({})  # per browser session: what it was last sent, so unchanged plots are not re-sent
    roots = allowed_paths(studio.workdir)

    def poll(last: dict[str, int]) -> tuple[Any, ...]:
        """Status line first ('idle', 'running: step 12/40', 'paused at step 12 — …', 'completed: LoRA saved to
        …', 'failed: …'); the last value says which samples there are (/samples returns them)."""
        run = studio.poll()
        with run.lock:
            key = {"run": run.run_id, "losses": len(run.losses), "evals": len(run.eval_losses),
                   "log": run.version, "status": run.status}
            fresh = last.get("run") != key["run"]
            plot_changed = last.get("losses") != key["losses"] or last.get("evals") != key["evals"]
            plot_value = loss_frame(run) if fresh or plot_changed else gr.skip()
            log_value = run.log_text() if fresh or last.get("log") != key["log"] else gr.skip()
            # A start's problems stay up until the run they were about moves on (e.g. "already in progress").
            moved_on = bool(last) and last.get("status") != run.status
            problems_value = gr.update(visible=False, value="") if moved_on else gr.skip()
            return (run.status_text(), progress_html(run), plot_value, log_value, problems_value, key,
                    [run.run_id, len(run.samples)])

    def samples() -> list[tuple[Any, str]]:
        """The sample images so far, each labelled with its step and prompt."""
        with studio.view.lock:
            return gallery_items(studio.view, roots, studio.folders)

    # The gallery has a state of its own, changed by the poll only when a sample arrives: gradio rebuilds an output
    # that is skipped (20 ms for a gallery, a tenth of that for the others), so the poll never names the gallery.
    shown = gr.State([0, 0])
    shown.change(samples, None, view.gallery, api_name="samples", show_progress="hidden", concurrency_limit=None)

    gauge_timer = gr.Timer(2.0)  # NVML and psutil reads are cheap, but need not follow every progress poll
    gauge_timer.tick(lambda: gauges_html(read_gauges()), None, view.memory, api_name="memory_gauges",
                     show_progress="hidden", concurrency_limit=None)
    timer = gr.Timer(1.0)
    timer.tick(poll, seen, [view.status, view.progress, view.plot, view.log, view.problems, seen, shown],
               api_name="poll", show_progress="hidden", concurrency_limit=None)
