"""Memory Estimator tab: what the form's job needs on one GPU size — the totals with the verdict and the
suggestion, a stacked bar of VRAM per phase, the four strategies side by side, and the breakdown. Estimates
take milliseconds (trainer/estimator/, torch-free): the tab refreshes on its button and when it is opened."""

from __future__ import annotations

from typing import Any

import gradio as gr

from trainer.estimator.core import PHASES
from ui import form
from ui.lowvram_tab import VERDICT_CSS, VERDICT_HTML
from ui.memory import (
    BREAKDOWN_COLUMNS,
    PHASE_COLUMNS,
    STRATEGY_COLUMNS,
    EstimatorReport,
    apply_suggestion,
    estimate_form,
    gpu_problems,
)
from ui.model_tab import form_updates
from ui.words import labels_of, warn_as_typed


def phase_frame(report: EstimatorReport) -> Any:  # noqa: ANN401 - a pandas DataFrame (pandas comes with gradio)
    """The bars' rows; None when there are none: a gradio plot that once showed an empty frame with a colour column
    never draws later frames (gradio 6.31)."""
    import pandas as pd

    if not report.phase_rows:
        return None
    # Typed columns: the plot takes its axis types from the dtypes.
    frame = pd.DataFrame(report.phase_rows, columns=PHASE_COLUMNS)
    return frame.astype({"phase": "str", "part": "str", "GiB": "float64"})


def table_frame(rows: list[list[Any]], columns: list[str]) -> Any:  # noqa: ANN401 - a pandas DataFrame
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def report_outputs(report: EstimatorReport) -> tuple[str, str, Any, Any, Any]:
    """(verdict line, details markdown, phase frame, strategies frame, breakdown frame)."""
    return (report.line, report.details, phase_frame(report), table_frame(report.strategy_rows, STRATEGY_COLUMNS),
            table_frame(report.breakdown_rows, BREAKDOWN_COLUMNS))


def initial_gpu(defaults: dict[str, Any], detected: float | None) -> float:
    """The GPU size the tab opens with: the job's GPU memory to plan for, else the detected GPU, else 0 (which
    the estimate reads as "the planned or detected GPU": never empty, so the API has a default for it)."""
    try:
        planned = float(defaults.get("lowvram.vram_gib") or 0)
    except (TypeError, ValueError):
        planned = 0.0
    return planned or detected or 0.0


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any], base: gr.State,
          detected: float | None, tab: gr.Tab | None = None) -> None:
    """The tab's controls and handlers; needs every form field (it estimates the whole job). With `tab`, opening
    the tab refreshes the estimate."""
    with gr.Row(equal_height=True):
        gpu = gr.Number(value=initial_gpu(defaults, detected), label="GPU memory (GiB)",
                        info="0: the Low VRAM tab's GPU memory to plan for, else the detected GPU", scale=3)
        warn_as_typed(gpu, gpu_problems)
        run = gr.Button("Estimate", variant="primary", scale=1)
    first = estimate_form(defaults, None, 0, detected)
    verdict = gr.HTML(first.line, html_template=VERDICT_HTML, css_template=VERDICT_CSS, label="Verdict")
    with gr.Row():
        bars = gr.BarPlot(phase_frame(first), x="phase", y="GiB", color="part", sort=list(PHASES),
                          title="VRAM per phase", y_title="GiB", label="VRAM per phase", scale=3)
        with gr.Column(scale=2):
            details = gr.Markdown(first.details)
            apply = gr.Button("Apply “To fit” to the form", size="sm", elem_id="apply-to-fit")
            applied = gr.Markdown("", elem_id="applied-to-fit")
    strategies = gr.Dataframe(table_frame(first.strategy_rows, STRATEGY_COLUMNS), label="Strategies for this job",
                              interactive=False, wrap=True, column_widths=["20%", "10%", "10%", "12%", "48%"])
    breakdown = gr.Dataframe(table_frame(first.breakdown_rows, BREAKDOWN_COLUMNS),
                             label="Breakdown of the training step on the GPU", interactive=False,
                             column_widths=["80%", "20%"])

    def estimate_job(values: dict[str, Any]) -> tuple[str, str, Any, Any, Any]:
        """Estimate the form's job on `gpu_vram_gib` GiB (0: the planned or detected GPU): the verdict line
        ('fits', 'tight', 'will not fit', 'no verdict', or 'problems — …' naming each bad field), details
        (plan, suggestion, VRAM and RAM per phase), VRAM per phase and part, the strategies, the breakdown."""
        report = estimate_form(values, values.pop("base", None), values.pop("gpu_vram_gib", None), detected,
                               labels_of(fields))
        return report_outputs(report)

    form_kwargs = {**{form.api_name(key): fields[key] for key in form.FORM_KEYS}, "base": base,
                   "gpu_vram_gib": gpu}
    outputs = [verdict, details, bars, strategies, breakdown]
    handler = form.keyword_handler(estimate_job, extra=("base", "gpu_vram_gib"))
    run.click(handler, inputs_kwargs=form_kwargs, outputs=outputs, api_name="estimate", show_progress="hidden")

    def apply_to_fit(values: dict[str, Any]) -> dict[Any, Any]:
        """Make the estimator's "To fit" changes in the form (every tab follows), then estimate again."""
        changed, message = apply_suggestion(values, values.pop("base", None), values.pop("gpu_vram_gib", None),
                                            detected)
        if changed is None:
            return {applied: f"**{message}**"}
        return {**form_updates(fields, changed), applied: message}

    apply.click(form.keyword_handler(apply_to_fit, extra=("base", "gpu_vram_gib")), inputs_kwargs=form_kwargs,
                outputs=[*fields.values(), applied], api_name="apply_to_fit", show_progress="hidden").then(
        handler, inputs_kwargs=form_kwargs, outputs=outputs, api_visibility="private", show_progress="hidden")
    if tab is not None:
        tab.select(handler, inputs_kwargs=form_kwargs, outputs=outputs, api_visibility="private",
                   show_progress="hidden")

    def follow_plan(text: str) -> Any:  # noqa: ANN401 - a gradio update
        """The GPU size follows the Low VRAM tab's GPU memory to plan for (empty: the detected GPU)."""
        try:
            planned = float(text) if str(text or "").strip() else None
        except ValueError:
            return gr.update()  # the estimate names the bad field
        return planned or detected or 0

    fields["lowvram.vram_gib"].change(follow_plan, fields["lowvram.vram_gib"], gpu, api_visibility="private",
                                      show_progress="hidden")
