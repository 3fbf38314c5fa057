"""Watchers never slow the run (issue 22, point 3): one publisher drains the run's events, renders and serialises
the Run tab's state once per change, and every page's poll only sends those bytes (or 304) from a plain route
behind the page's login; the snapshot's plots are the LinePlots' own wire format. The speed itself is measured by
bench/bench_pollers.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from test_ui_state import FakeRunner, progress

from trainer.events import ClipScore, LogMessage
from trainer.runners.caption import CaptionSnapshot
from ui import run_publisher, run_state
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


def test_pages_polling_only_send_what_the_publisher_made_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    studio = Studio(CountingRunner(), tmp_path)
    studio.view.begin(1000, "watched")
    publisher = studio.publisher
    first = publisher.publish()
    answers = [studio.snapshot() for _ in range(20)] + [publisher.latest().snapshot for _ in range(20)]
    assert all(answer is first.snapshot for answer in answers)  # twenty pages: nothing drained or rendered
    assert studio.runner.drains == 1 and publisher.renders == 1
    assert all(publisher.latest().parts["state"].body is first.parts["state"].body for _ in range(20))
    state = json.loads(first.parts["state"].body)
    assert state["status_text"] == "running: step 1/1000" and state["actions"] == studio.actions()
    assert state["caption"] == "idle"  # the Dataset tab's captioning line comes with it
    assert state["preview"] == f"{first.snapshot.run_id}:"  # no sample renders: the page asks for no preview
    assert json.loads(first.parts["plot"].body) == first.snapshot.plot

    publisher.publish()  # within SNAPSHOT_EVERY_S new steps wait: drained, not rendered
    assert studio.runner.drains == 2 and publisher.renders == 1
    monkeypatch.setattr(run_publisher, "SNAPSHOT_EVERY_S", 0.0)
    later = publisher.publish()
    assert later.snapshot.status_text == "running: step 3/1000" and publisher.renders == 2
    assert later.parts["state"].etag != first.parts["state"].etag
    # the plot is redrawn every PLOT_EVERY_S only, and a part that did not change is not serialised again
    assert later.parts["plot"] is first.parts["plot"] and later.parts["log"] is first.parts["log"]
    monkeypatch.setattr(run_state, "PLOT_EVERY_S", 0.0)
    assert json.loads(publisher.publish().parts["plot"].body)["data"][-1][0] == 4

    monkeypatch.setattr(run_publisher, "SNAPSHOT_EVERY_S", 60.0)
    assert studio.stop().startswith("stopping")  # a change of status is published at the next tick, not later
    assert publisher.publish().snapshot.status == "stopping"

    failed = CaptionSnapshot("failed", 0, 3, "", "failed: out of memory; lower --batch-size", "log --batch-size", 7)
    monkeypatch.setattr(studio.captioning, "snapshot", lambda: failed)
    state = json.loads(publisher.publish().parts["state"].body)  # captioning changed: published at once
    assert state["caption"].startswith("failed: out of memory; lower Batch size (") and "--" not in state["caption"]


def test_the_snapshot_plots_are_what_the_line_plots_send(tmp_path) -> None:
    import gradio as gr

    from ui.run_tab import clip_frame, loss_frame

    view = RunView()
    view.begin(10)
    view.apply([progress(1, 0.5), progress(2, float("nan")), progress(3, 0.25), LogMessage(level="info", message="x"),
                ClipScore(step=2, score=21.5)])
    plot = gr.LinePlot(x="step", y="loss", color="series")
    sent = plot.postprocess(loss_frame(view)).model_dump()
    snap = view.snapshot()
    assert snap.plot == sent and sent["data"][2] == [2, None, "loss"]  # a NaN loss is a gap in both
    assert plot.postprocess(snap.plot) is snap.plot  # sent as it is: no conversion per page
    clip = gr.LinePlot(x="step", y="clip_score").postprocess(clip_frame(view)).model_dump()
    assert snap.clip_plot == clip and snap.clips == 1
    assert snap.log_text == view.log_text() and snap.logged == 1
    assert RunView().snapshot().plot is None and RunView().snapshot().clip_plot is None  # as the plots need


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_the_route_serves_the_published_parts_behind_the_login(tmp_path) -> None:
    import gradio as gr
    from test_login_throttle import _free_port

    from ui.run_route import ROUTE, add_run_route

    studio = Studio(FakeRunner(), tmp_path)
    with gr.Blocks() as blocks:
        gr.Markdown("hello")
    blocks.launch(prevent_thread_lock=True, server_port=_free_port(), auth=("u", "p"), quiet=True)
    try:
        add_run_route(blocks.server_app, studio.publisher)
        state_url = f"{blocks.local_url.rstrip('/')}{ROUTE}/state"
        assert _get(state_url)[0] == 401  # the page's login guards it
        login = urllib.parse.urlencode({"username": "u", "password": "p"}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{blocks.local_url}login", data=login)) as answer:
            cookie = "; ".join(value.split(";")[0] for key, value in answer.headers.items() if key == "set-cookie")
        status, headers, body = _get(state_url, {"Cookie": cookie})
        assert status == 200 and json.loads(body)["status_text"] == "idle"
        etag = headers["etag"]
        assert _get(state_url, {"Cookie": cookie, "If-None-Match": etag})[0] == 304  # the page has it: no body
        studio.view.refuse("not started: the job has problems")
        studio.publisher.publish()
        status, headers, body = _get(state_url, {"Cookie": cookie, "If-None-Match": etag})
        assert status == 200 and headers["etag"] != etag
        assert json.loads(body)["status_text"] == "not started: the job has problems"
        status, _, body = _get(state_url.replace("/state", "/log"), {"Cookie": cookie})
        assert status == 200 and json.loads(body).endswith("error: not started: the job has problems")
        assert _get(state_url.replace("/state", "/other"), {"Cookie": cookie})[0] == 404
    finally:
        blocks.close()
