"""The runner without gradio: one live session driven by actions — train n steps, validate, save, stop, end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trainer.events import Event, LogMessage, LoraSaved, PhaseChanged, Progress, RunFinished, RunStarted, SampleSaved
from trainer.runners.base import (
    AlreadyRunning,
    EndTraining,
    NothingToDo,
    RunRequest,
    SaveNow,
    TrainSteps,
    ValidateNow,
)
from trainer.runners.thread import TrainingRunner
from trainer.spec import load_spec, resolve_paths

TIMEOUT = 120


def _spec(demo_dir: Path, out: Path, *extra: str):  # noqa: ANN202
    settings = ["train.max_steps=10", "sample.prompts=[]", f"output.dir='{out}'", *extra]
    return resolve_paths(load_spec(demo_dir / "job.toml", settings), demo_dir)


def _finish(runner: TrainingRunner, events: list[Event]) -> list[Event]:
    assert runner.join(TIMEOUT), f"the action {runner.action} did not finish"
    events.extend(runner.drain())
    return events


def _of(events: list[Event], kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def _paused_steps(events: list[Event]) -> list[str]:
    return [event.detail for event in _of(events, PhaseChanged) if event.phase == "paused"]


def test_nothing_to_do_without_a_session():
    runner = TrainingRunner()
    with pytest.raises(NothingToDo, match="nothing to sample: start or train first"):
        runner.send(ValidateNow())
    with pytest.raises(NothingToDo, match="nothing to save"):
        runner.send(SaveNow())
    with pytest.raises(NothingToDo, match="no session to end"):
        runner.send(EndTraining())
    assert runner.stop() is False
    assert not runner.running and not runner.live and runner.step is None


def test_train_steps_continue_the_same_session_and_end_frees_it(demo_dir: Path, tmp_path: Path):
    runner = TrainingRunner()
    events: list[Event] = []
    runner.send(TrainSteps(3, RunRequest(_spec(demo_dir, tmp_path))))
    _finish(runner, events)
    assert runner.live and runner.paused and runner.step == 3
    first = len(events)
    runner.send(TrainSteps(2, RunRequest(_spec(demo_dir, tmp_path / "ignored"))))  # the live session keeps its own spec
    _finish(runner, events)
    assert [event.step for event in _of(events, Progress)] == [1, 2, 3, 4, 5]
    assert len(_of(events, RunStarted)) == 1
    assert "loading" in [event.phase for event in _of(events[:first], PhaseChanged)]
    assert "loading" not in [event.phase for event in _of(events[first:], PhaseChanged)]  # nothing loaded again
    assert _paused_steps(events) == ["step 3", "step 5"]
    assert not _of(events, RunFinished) and not (tmp_path / "ignored").exists()
    with pytest.raises(AlreadyRunning, match="paused at step 5"):
        runner.start(RunRequest(_spec(demo_dir, tmp_path)))

    runner.send(EndTraining())
    _finish(runner, events)
    finished = _of(events, RunFinished)
    assert [(f.status, f.step) for f in finished] == [("stopped", 5)]  # 5 of max_steps 10
    assert finished[0].lora_path == str(tmp_path / "demo_lora.safetensors") and Path(finished[0].lora_path).is_file()
    assert (tmp_path / "state" / "step000005.safetensors").is_file()
    assert not runner.live and runner.step is None
    assert '"run_finished"' in (tmp_path / "events.jsonl").read_text().splitlines()[-1]


def test_validate_and_save_while_paused(demo_dir: Path, tmp_path: Path):
    runner = TrainingRunner()
    events: list[Event] = []
    spec = _spec(demo_dir, tmp_path, "train.max_steps=2", "sample.prompts=['shapez a red circle']",
                 "sample.every_steps=0", "sample.steps=2")
    runner.send(TrainSteps(2, RunRequest(spec)))
    _finish(runner, events)
    assert runner.step == 2 and not _of(events, SampleSaved)

    assert runner.send(ValidateNow()) == "started"
    _finish(runner, events)
    assert [(s.step, Path(s.path).name) for s in _of(events, SampleSaved)] == [(2, "step000002_0.png")]
    assert (tmp_path / "samples" / "step000002_0.png").is_file()

    assert runner.send(SaveNow()) == "started"
    _finish(runner, events)
    assert (tmp_path / "demo_lora-step000002.safetensors").is_file()
    assert [saved.step for saved in _of(events, LoraSaved)] == [2]
    assert _paused_steps(events) == ["step 2"] * 3 and runner.live

    runner.send(EndTraining())
    _finish(runner, events)
    assert [(f.status, f.step) for f in _of(events, RunFinished)] == [("completed", 2)]  # max_steps reached
    assert (tmp_path / "demo_lora.safetensors").is_file() and not runner.live


def test_stop_during_a_long_run_pauses_with_the_lora_saved(demo_dir: Path, tmp_path: Path):
    runner = TrainingRunner()
    events: list[Event] = []
    spec = _spec(demo_dir, tmp_path, "train.max_steps=100000")
    runner.send(TrainSteps(100000, RunRequest(spec)))
    deadline = time.monotonic() + TIMEOUT
    while not _of(events, Progress) and time.monotonic() < deadline:
        events.extend(runner.drain())
        time.sleep(0.05)
    assert runner.running and runner.action == "train_steps"
    with pytest.raises(AlreadyRunning):
        runner.send(TrainSteps(1, RunRequest(spec)))
    with pytest.raises(AlreadyRunning):
        runner.start(RunRequest(spec))
    with pytest.raises(AlreadyRunning):
        runner.send(EndTraining())
    with pytest.raises(NothingToDo, match="no sample prompts"):
        runner.send(ValidateNow())
    assert runner.send(SaveNow()) == "requested"
    assert runner.stop() is True
    _finish(runner, events)

    step = runner.step
    assert 0 < step < 100000 and runner.paused
    assert _paused_steps(events) == [f"step {step}"]
    assert (tmp_path / "demo_lora.safetensors").is_file()
    assert (tmp_path / "state" / f"step{step:06d}.safetensors").is_file()
    assert any("stopped at step" in log.message for log in _of(events, LogMessage))
    assert not _of(events, RunFinished)

    runner.send(TrainSteps(2, RunRequest(spec)))  # training continues from where it stopped
    _finish(runner, events)
    assert [p.step for p in _of(events, Progress)][-2:] == [step + 1, step + 2]
    runner.send(EndTraining())
    _finish(runner, events)
    assert _of(events, RunFinished)[-1].status == "stopped" and not runner.live


def test_a_failing_action_leaves_the_runner_usable(demo_dir: Path, tmp_path: Path):
    runner = TrainingRunner()
    events: list[Event] = []
    missing = _spec(demo_dir, tmp_path / "a", f"data.datasets=[{{path='{tmp_path / 'nowhere'}'}}]")
    runner.send(TrainSteps(2, RunRequest(missing)))
    _finish(runner, events)
    failed = _of(events, RunFinished)
    assert [f.status for f in failed] == ["failed"] and "nowhere" in failed[0].message
    assert not runner.live and not runner.running

    spec = _spec(demo_dir, tmp_path / "b", "sample.prompts=['x']", "sample.every_steps=0")
    runner.send(TrainSteps(1, RunRequest(spec)))
    _finish(runner, events)

    def boom() -> None:
        raise RuntimeError("boom")

    runner._session.validate = boom  # a failure inside an action on a live session
    runner.send(ValidateNow())
    _finish(runner, events)
    assert _of(events, RunFinished)[-1].status == "failed"
    assert _of(events, RunFinished)[-1].message == "RuntimeError: boom"
    assert not runner.live

    runner.start(RunRequest(_spec(demo_dir, tmp_path / "c", "train.max_steps=2")))
    _finish(runner, events)
    assert _of(events, RunFinished)[-1].status == "completed"
    assert (tmp_path / "c" / "demo_lora.safetensors").is_file() and not runner.live


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_a_whole_run_and_the_same_steps_step_by_step_end_with_the_same_files(demo_dir: Path, tmp_path: Path):
    """Start (Session.run) and Train 3 + Train 2 + End training follow one lifecycle: the same samples (the baseline,
    the interval's, the final one), the same LoRA and state files, the same weights."""
    from safetensors.torch import load_file

    settings = ("train.max_steps=5", "sample.prompts=['shapez a red circle']", "sample.every_steps=4",
                "sample.steps=2")
    whole, stepwise = tmp_path / "whole", tmp_path / "stepwise"
    runner, events = TrainingRunner(), []
    runner.start(RunRequest(_spec(demo_dir, whole, *settings)))
    _finish(runner, events)
    runner.send(TrainSteps(3, RunRequest(_spec(demo_dir, stepwise, *settings))))
    _finish(runner, events)
    runner.send(TrainSteps(2))
    _finish(runner, events)
    runner.send(EndTraining())
    _finish(runner, events)

    assert [(f.status, f.step) for f in _of(events, RunFinished)] == [("completed", 5)] * 2
    assert _files(whole) == _files(stepwise)
    assert [name for name in _files(whole) if name.startswith("samples")] == [
        "samples/step000000_0.png", "samples/step000004_0.png", "samples/step000005_0.png"]
    lora_a, lora_b = load_file(whole / "demo_lora.safetensors"), load_file(stepwise / "demo_lora.safetensors")
    assert lora_a.keys() == lora_b.keys() and all(lora_a[key].equal(lora_b[key]) for key in lora_a)
