"""Runs tab: every run in the workdir's output folder (the running one first, kept up to date), and for the one
chosen its loss curve, samples and LoRA files to download; Resume for a run that did not finish, Delete to move it
to the workdir's trash. Reading the folders is ui/run_history.py's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from ui.feedback import problems_update
from ui.quickstart_tab import RUN_TAB
from ui.run_history import COLUMNS, Run
from ui.run_tab import LOSS_COLOURS, loss_frame
from ui.studio import Outcome, Studio

REFRESH_SECONDS = 2.0
# Asked in the browser before the run's folder moves: a declined move sends no name, and nothing happens.
CONFIRM_DELETE = "(name) => confirm(`Move the run ${name} to the trash folder of the workdir?`) ? name : null"


def table(runs: list[Run]) -> Any:  # noqa: ANN401 - a pandas DataFrame (pandas comes with gradio)
    import pandas as pd

    return pd.DataFrame([run.row() for run in runs], columns=COLUMNS)


def details_markdown(run: Run) -> str:
    lines = [f"**{run.name}** — {run.status}, step {run.steps_done} of {run.steps_planned}, in `{run.folder}`"]
    if run.detail:
        lines.append(run.detail)
    if not run.loras:
        lines.append("No LoRA file yet.")
    return "\n\n".join(lines)


def run_outputs(studio: Studio, name: str | None) -> tuple[Any, ...]:
    """For the run called `name`: details, Resume and Delete buttons, loss frame, samples, LoRA files."""
    run = next((run for run in studio.history.runs(studio.live_output_dir()) if run.name == name), None)
    if run is None:
        return "", gr.update(visible=False), gr.update(visible=False), None, [], None
    return (details_markdown(run), gr.update(visible=run.resumable), gr.update(visible=run.status != "running"),
            loss_frame(run.view), run.samples(),  # inside the output folder, which gradio serves
            [str(path) for path in run.loras] or None)


def trash_run(studio: Studio, name: str | None) -> tuple[Any, Any, Any]:
    """(problems, run menu, the list last sent) after moving the run to the workdir's trash folder; nothing when
    the person declined (the page's confirmation sends no name)."""
    if not name:
        return gr.skip(), gr.skip(), gr.skip()
    try:
        where = studio.history.trash(name or "", studio.live_output_dir())
    except Exception as exc:  # noqa: BLE001 - PathRefused, or the move failing: shown, the app lives
        return problems_update(Outcome("not deleted", [str(exc)])), gr.skip(), gr.skip()
    gr.Info(f"{name} moved to {where}")
    return problems_update(Outcome("deleted")), gr.update(value=None), None


def build(studio: Studio) -> Callable[..., None]:
    """The tab's controls; returns `connect(fields, base, baseline, tabs, form_updates, tab)`: Resume fills the form
    with the run's job and opens the Run tab; opening this tab refreshes the list."""
    runs = studio.history.runs(studio.live_output_dir())
    with gr.Row(equal_height=True):
        chosen = gr.Dropdown(choices=[run.name for run in runs], value=None, label="Run", scale=3,
                             info="or click its row in the list")
        resume = gr.Button("Resume", variant="primary", scale=1, visible=False)
        delete = gr.Button("Delete", variant="stop", scale=1, visible=False)
    listing = gr.Dataframe(table(runs), label="Runs (output folder)", interactive=False, elem_id="runs-table")
    details = gr.Markdown("", elem_id="runs-details")
    problems = gr.Textbox(label="Problems", visible=False, interactive=False, lines=2)
    with gr.Row():
        plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", label="Loss", color_title="",
                           color_map=LOSS_COLOURS, scale=1, elem_id="runs-loss")
        gallery = gr.Gallery(label="Samples", columns=3, height=300, scale=1, object_fit="contain",
                             elem_id="runs-samples")
    files = gr.File(label="LoRA files", file_count="multiple", interactive=False, elem_id="runs-loras")
    seen = gr.State(None)  # the list as last sent to this browser: only a change is sent again

    def show(name: str | None) -> tuple[Any, ...]:
        """The chosen run: details, Resume and Delete, the loss curve, samples, LoRA files."""
        return run_outputs(studio, name)

    shown = [details, resume, delete, plot, gallery, files]

    def refresh(last: Any, name: str | None) -> tuple[Any, ...]:  # noqa: ANN401
        """The list and the run menu's choices when they changed; the chosen run again when its row did (the
        running one moves on)."""
        current = studio.history.runs(studio.live_output_dir())
        rows = [run.row() for run in current]
        if rows == last:
            return (gr.skip(),) * (3 + len(shown))
        before = {row[0]: row for row in last or []}
        after = {row[0]: row for row in rows}
        again = show(name) if name and before.get(name) != after.get(name) else (gr.skip(),) * len(shown)
        return (table(current), gr.update(choices=[run.name for run in current]), rows, *again)

    listed = [listing, chosen, seen, *shown]
    chosen.change(show, chosen, shown, api_name="run_details", show_progress="hidden")

    def pick(event: gr.SelectData) -> Any:  # noqa: ANN401
        return event.row_value[0] if event.row_value else gr.skip()

    listing.select(pick, None, chosen, api_visibility="private")
    timer = gr.Timer(REFRESH_SECONDS)
    timer.tick(refresh, [seen, chosen], listed, api_name="runs", show_progress="hidden", concurrency_limit=None)

    def trash(name: str | None) -> tuple[Any, ...]:
        """Move the chosen run to the workdir's trash folder."""
        return trash_run(studio, name)

    # "multiple": gradio's default ("once") drops a click while this button's previous event still waits in the
    # queue, so a Delete accepted right after a declined one was lost.
    delete.click(trash, chosen, [problems, chosen, seen], api_name="delete_run", js=CONFIRM_DELETE,
                 trigger_mode="multiple").then(
        refresh, [seen, chosen], listed, api_visibility="private")

    def connect(fields: dict[str, gr.components.Component], base: gr.State, baseline: gr.State, tabs: gr.Tabs,
                form_updates: Callable[[dict[str, Any], dict[str, Any]], dict[Any, Any]], tab: gr.Tab) -> None:
        tab.select(refresh, [seen, chosen], listed, api_visibility="private", show_progress="hidden")

        def resume_run(name: str | None) -> dict[Any, Any]:
            """Fill the form with the run's job as it ran and continue it from its latest saved state."""
            values, hidden, outcome = studio.run_job(name or "")
            if values is not None:
                outcome = studio.start(values, hidden, resume=True)
            if not outcome.ok:
                return {problems: problems_update(outcome)}
            return {**form_updates(fields, values), base: hidden, baseline: values, problems: problems_update(outcome),
                    tabs: gr.Tabs(selected=RUN_TAB)}

        resume.click(resume_run, chosen, [*fields.values(), base, baseline, problems, tabs], api_name="resume_run",
                     concurrency_limit=1)

    return connect

