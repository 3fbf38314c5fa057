"""The job bar above the tabs: save the whole form as a job TOML (to a path, and as a download), load one from a
path or an upload into every tab, and the form remembered across restarts (restored when the page loads, kept
on every change)."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ui import form
from ui.jobs import Outcome
from ui.served import allowed_paths
from ui.studio import Studio

FormUpdates = Callable[[dict[str, gr.components.Component], dict[str, Any]], dict[Any, Any]]


def outcome_markdown(outcome: Outcome) -> str:
    """The bar's notice: the message, then each problem or note on its own line."""
    lines = [f"**{outcome.message}**" if not outcome.ok else outcome.message]
    lines += [f"- {line}" for line in [*outcome.problems, *outcome.notes] if line != outcome.message]
    return "\n".join(lines)


def downloadable(path: Path, served: list[str]) -> str:
    """A path gradio will hand to the browser: the file itself when it lies in a folder the app serves, else a
    copy in the system's temp folder (gradio serves files returned from there, never the user's other folders)."""
    if any(path.resolve().is_relative_to(root) for root in served):
        return str(path)
    copy = Path(tempfile.mkdtemp(prefix="studio-job-")) / path.name
    shutil.copyfile(path, copy)
    return str(copy)


@dataclass(frozen=True)
class _Bar:
    job_path: gr.Textbox
    save: gr.Button
    load: gr.Button
    upload: gr.UploadButton
    notice: gr.Markdown
    download: gr.DownloadButton


def build(studio: Studio) -> Callable[..., None]:
    """The bar's controls; returns `connect(fields, base, baseline, defaults, form_updates, app)`, to call once
    every tab's fields exist."""
    with gr.Row(equal_height=True):
        job_path = gr.Textbox(
            show_label=False, container=False, scale=5, elem_id="job-path",
            placeholder="job file (.toml) to save or load; empty: .studio/jobs/<LoRA name>.toml (paths start in "
                        "the app's workdir)")
        save = gr.Button("Save job", scale=1, min_width=110, size="md")
        load = gr.Button("Load job", scale=1, min_width=110, size="md")
        upload = gr.UploadButton("Upload job…", file_types=[".toml"], type="filepath", scale=1, min_width=110,
                                 size="md")
        # In the bar, not a file box under it: that pushed the tabs down by a hand's width after every save.
        download = gr.DownloadButton("Download job", visible=False, scale=1, min_width=110, size="md",
                                     elem_id="job-download")
    notice = gr.Markdown("", elem_id="job-notice")
    return functools.partial(_connect, studio, _Bar(job_path, save, load, upload, notice, download))


def _connect(studio: Studio, bar: _Bar, fields: dict[str, gr.components.Component], base: gr.State,
             baseline: gr.State, defaults: dict[str, Any], form_updates: FormUpdates, app: gr.Blocks) -> None:
    form_kwargs = {**{form.api_name(key): fields[key] for key in form.FORM_KEYS}, "base": base}
    filled = [*fields.values(), base, baseline, bar.notice]

    def fill(values: dict[str, Any] | None, hidden: dict[str, Any] | None, outcome: Outcome,
             filled: dict[str, Any] | None = None) -> dict[Any, Any]:
        """Every tab shows the job; what differs from `filled` (default: the app's defaults, so all a loaded
        job sets) counts as the user's own edits, which a preset keeps."""
        updates: dict[Any, Any] = {bar.notice: outcome_markdown(outcome)}
        if values is None:
            for problem in outcome.problems[:3]:
                gr.Warning(problem)
            return updates
        for note in outcome.notes:
            gr.Warning(note)
        return {**updates, **form_updates(fields, values), base: hidden, baseline: filled or defaults}

    _connect_save(studio, bar, form_kwargs)
    _connect_load(studio, bar, fill, filled, app)

    def remember(values: dict[str, Any]) -> None:
        studio.remember(values, values.pop("base", None), values.pop("baseline", None))

    # always_last: a loaded job or a preset changes every control at once; only the final form matters.
    gr.on([component.change for component in fields.values()],
          form.keyword_handler(remember, extra=("base", "baseline")),
          inputs_kwargs={**form_kwargs, "baseline": baseline}, outputs=None, api_visibility="private",
          show_progress="hidden", trigger_mode="always_last")


def _connect_save(studio: Studio, bar: _Bar, form_kwargs: dict[str, Any]) -> None:
    served = [str(Path(root).resolve()) for root in allowed_paths(studio.workdir)]

    def save_job(values: dict[str, Any]) -> tuple[Any, str, Any]:
        """Write the form's job as TOML to job_path (empty: .studio/jobs/<LoRA name>.toml) and offer it for
        download: the notice first ('saved PATH' or 'not saved: …' with the problems)."""
        path, outcome = studio.save_job(values, values.pop("base", None), values.pop("job_path", None))
        if path is None:
            for problem in outcome.problems[:3]:
                gr.Warning(problem)
            return outcome_markdown(outcome), gr.update(), gr.update(visible=False)
        return outcome_markdown(outcome), str(path), gr.update(value=downloadable(path, served), visible=True)

    bar.save.click(form.keyword_handler(save_job, extra=("base", "job_path")),
                   inputs_kwargs={**form_kwargs, "job_path": bar.job_path},
                   outputs=[bar.notice, bar.job_path, bar.download], api_name="save_job")


def _connect_load(studio: Studio, bar: _Bar, fill: Callable[..., dict[Any, Any]], filled: list[Any],
                  app: gr.Blocks) -> None:
    """Load job, Upload job, and the remembered form restored when the page loads."""

    def load_job(path: str) -> dict[Any, Any]:
        if not str(path or "").strip():
            return fill(None, None, Outcome("not loaded: type the path of a job file first",
                                            ["no job file given"]))
        return fill(*studio.load_job(path))

    bar.load.click(load_job, bar.job_path, filled, api_name="load_job")

    def upload_job(path: str | None) -> dict[Any, Any]:
        if not path:
            return {}
        return fill(*studio.load_upload(path))

    bar.upload.upload(upload_job, bar.upload, filled, api_visibility="private")

    def restore() -> dict[Any, Any]:
        """The form as it was when the app last ran; a file that cannot be read leaves the demo job and says
        why."""
        values, hidden, text, remembered = studio.restore()
        if values is None:
            if text:
                gr.Warning(text)
            return {bar.notice: f"**{text}**" if text else ""}
        return fill(values, hidden, Outcome(f"The form is as it was left (kept in {studio.last_form.path})."),
                    remembered)

    app.load(restore, None, filled, api_visibility="private", show_progress="hidden")
