"""The Run tab's workflow through the Studio object (what the buttons call), on the prebuilt demo with the real
in-process runner: a stopped run is continued, never silently replaced; a Start over it asks; a new run sets the
earlier one aside only once it trains; the buttons say why they cannot act; a refusal is the status line."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.events import EvalLoss, Progress, SampleSaved
from ui.run_state import RunView
from ui.studio import Studio


def _values(studio: Studio, demo_dir: Path, out: Path, **changes: object) -> dict:
    values = studio.default_values()
    values.update({"model.source": str(demo_dir / "flux2"), "dataset.path": str(demo_dir / "dataset"),
                   "output.dir": str(out), "train.max_steps": 8, "sample.prompts": "shapez a red circle",
                   "sample.every_steps": 2, "sample.steps": "2", "output.save_every_steps": 0})
    values.update(changes)
    return values


def _settle(studio: Studio) -> None:
    assert studio.runner.join(120), "the runner did not finish its action"
    studio.poll()


@pytest.fixture()
def studio(tmp_path: Path, demo_dir: Path) -> Studio:
    from trainer.runners.app import AppRunner
    from trainer.runners.thread import TrainingRunner

    return Studio(AppRunner(TrainingRunner()), tmp_path, allowed=[demo_dir])


def test_a_stopped_run_is_continued_and_a_new_start_asks_first(studio: Studio, demo_dir: Path, tmp_path: Path):
    out = tmp_path / "output" / "run"
    values = _values(studio, demo_dir, out)
    assert studio.actions()["stop"] == "no run in progress" and studio.actions()["start"] == ""
    assert studio.actions()["end"].startswith("no session to end")

    # Train 3 steps, then End training: the session ends before max_steps, and the page says "ended".
    assert studio.train_steps(values, 3).message.startswith("started: training 3 steps")
    _settle(studio)
    assert studio.view.paused and studio.actions()["end"] == "" and studio.actions()["start"].startswith(
        "a session is paused at step 3")
    studio.end_training()
    _settle(studio)
    assert studio.view.status_text().startswith("ended: LoRA saved to"), studio.view.status_text()
    sample_files = sorted(path.name for path in (out / "samples").iterdir())
    assert studio.offered_run(str(out), 8).step == 3  # the offer shows after End training

    # Start over it asks; nothing moves.
    refused = studio.start(values)
    assert not refused.ok and "a run stopped at step 3" in refused.message and "Start a new run" in refused.message
    assert studio.view.status_text() == refused.message  # the status line shows the question, not the last end
    assert studio.recheck(values) is None and studio.view.status_text() == refused.message  # a form edit keeps it
    assert not (out / "earlier_runs").exists()

    # Train N steps continues it from its state, with the loss plot and samples of before.
    assert studio.train_steps(values, 2).message == "continuing at step 3: training 2 steps, then pausing"
    _settle(studio)
    assert studio.runner.step == 5 and not (out / "earlier_runs").exists()
    assert [point.step for point in studio.view.losses] == [1, 2, 3, 4, 5]
    assert [sample.step for sample in studio.view.samples][:2] == [0, 2]  # the samples of before the resume
    studio.end_training()
    _settle(studio)

    # A new run, chosen: the earlier one goes to earlier_runs/ once the new one trains, whole.
    assert studio.start(values, new_run=True).ok
    _settle(studio)
    assert studio.view.status_text().startswith("completed"), studio.view.status_text()
    (aside,) = (out / "earlier_runs").iterdir()
    assert sorted(path.name for path in (aside / "samples").iterdir())[:len(sample_files)] == sample_files
    assert (aside / "demo_lora.safetensors").is_file() and (out / "demo_lora.safetensors").is_file()
    assert studio.offered_run(str(out), 8) is None


def test_a_refused_start_is_the_status_line_until_the_form_is_fixed(studio: Studio, demo_dir: Path,
                                                                    tmp_path: Path):
    values = _values(studio, demo_dir, tmp_path / "output" / "run", **{"lora.rank": 0})
    studio.view.apply([])
    outcome = studio.start(values)
    assert not outcome.ok and studio.view.status_text() == outcome.message
    assert "no run started" in studio.view.progress_line()
    assert studio.recheck(values) == outcome.problems
    values["lora.rank"] = 4
    assert studio.recheck(values) == [] and studio.view.status_text() == "idle"


def test_a_resume_shows_the_history_from_before(tmp_path: Path):
    from trainer.events import JsonlWriter
    from ui.resume import read_history

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "step000004.safetensors").write_bytes(b"")
    writer = JsonlWriter(tmp_path / "events.jsonl")
    for step in (1, 2, 3, 4, 5, 6):  # a crash after step 6: the state of step 4 resumes
        writer(Progress(step=step, max_steps=10, loss=1.0 / step, learning_rate=1e-3, steps_per_second=1.0,
                        eta_seconds=1.0))
    writer(SampleSaved(step=2, path=str(tmp_path / "a.png"), prompt="p"))
    writer(EvalLoss(step=6, loss=0.5))
    writer.close()
    view = RunView()
    view.begin(10)
    view.restore_history(read_history(tmp_path))
    assert [point.step for point in view.losses] == [1, 2, 3, 4] and view.step == 4
    assert view.gallery() == [(str(tmp_path / "a.png"), "step 2: p")] and view.eval_losses == []
