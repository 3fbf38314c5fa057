"""How an Outcome of a button (ui/jobs.py) shows on the page: the problems box, and a warning toast for each of
the first few problems.
"""

from __future__ import annotations

from typing import Any

from ui.jobs import Outcome


def problems_update(outcome: Outcome) -> Any:  # noqa: ANN401 - a gradio update
    import gradio as gr

    if outcome.ok:
        return gr.update(visible=False, value="")
    for problem in outcome.problems[:3]:
        gr.Warning(problem)
    return gr.update(visible=True, value="\n".join(outcome.problems))
