"""Watchers never slow the run (issue 22, point 3): every page's poll is answered from one published snapshot, so
twenty pages drain and render what one does; the snapshot's plot is the LinePlot's own wire format. The speed
itself is measured by bench/bench_pollers.py."""

from __future__ import annotations

import pytest
from test_ui_state import FakeRunner, progress

from trainer.events import LogMessage
from ui import run_state
from ui.run_state import RunView
from ui.studio import Studio


class CountingRunner(FakeRunner):
    """A run in progress whose every drain brings a new step (a trainer sends events every 50 ms)."""

    def __init__(self) -> None:
        super().__init__(running=True)
        self.drains = 0

    def drain(self):
        self.drains += 1
        return [progress(self.drains, 1.0 / self.drains, 1000)]


def test_twenty_pages_polling_drain_and_render_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    studio = Studio(CountingRunner(), tmp_path)
    studio.view.begin(1000, "watched")
    renders = []
    real = RunView.snapshot
    monkeypatch.setattr(RunView, "snapshot", lambda view, previous=None: renders.append(1) or real(view, previous))
    first = studio.snapshot()
    answers = [studio.snapshot() for _ in range(20)]  # twenty pages within the same half second
    assert all(answer is first for answer in answers)
    assert studio.runner.drains == 1 and len(renders) == 1
    assert first.status_text == "running: step 1/1000" and first.losses == 1

    monkeypatch.setattr(run_state, "SNAPSHOT_EVERY_S", 0.0)
    monkeypatch.setattr("ui.studio.SNAPSHOT_EVERY_S", 0.0)
    later = studio.snapshot()  # once the snapshot is old, the next poll publishes a fresh one
    assert later is not first and later.status_text == "running: step 2/1000" and studio.runner.drains == 2
    assert later.plot is first.plot and later.losses == 1  # the plot is redrawn every PLOT_EVERY_S only
    monkeypatch.setattr(run_state, "PLOT_EVERY_S", 0.0)
    assert studio.snapshot().losses == 3

    monkeypatch.setattr("ui.studio.SNAPSHOT_EVERY_S", 60.0)
    assert studio.stop().startswith("stopping")  # a change made here shows at once, not a snapshot later
    assert studio.snapshot().status == "stopping"


def test_the_snapshot_plot_is_what_the_line_plot_sends(tmp_path) -> None:
    import gradio as gr

    from ui.run_tab import loss_frame

    view = RunView()
    view.begin(10)
    view.apply([progress(1, 0.5), progress(2, float("nan")), progress(3, 0.25), LogMessage(level="info", message="x")])
    plot = gr.LinePlot(x="step", y="loss", color="series")
    sent = plot.postprocess(loss_frame(view)).model_dump()
    snap = view.snapshot()
    assert snap.plot == sent and sent["data"][2] == [2, None, "loss"]  # a NaN loss is a gap in both
    assert plot.postprocess(snap.plot) is snap.plot  # sent as it is: no conversion per page
    assert snap.log_text == view.log_text() and snap.logged == 1
    assert RunView().snapshot().plot is None  # before the first step, as the plot needs
