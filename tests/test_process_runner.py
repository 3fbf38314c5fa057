"""The app's trainer process: the same actions, refusals and events as the in-process runner, across a pipe; a
trainer killed mid-run ends its run as failed with the reason, and the next run starts a fresh process."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import python_env

from trainer.events import Event, Progress, RunFinished
from trainer.runners.base import AlreadyRunning, EndTraining, NothingToDo, RunRequest, SaveNow, TrainSteps, ValidateNow
from trainer.runners.child import describe_exit
from trainer.runners.process import ProcessRunner
from trainer.spec import load_spec, resolve_paths

TIMEOUT = 120


def _spec(demo_dir: Path, out: Path, *extra: str):  # noqa: ANN202
    settings = ["train.max_steps=10", "sample.prompts=[]", f"output.dir='{out}'", *extra]
    return resolve_paths(load_spec(demo_dir / "job.toml", settings), demo_dir)


def _of(events: list[Event], kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


@pytest.fixture
def runner():  # noqa: ANN201
    runner = ProcessRunner(env={**python_env(), "OMP_NUM_THREADS": "1"})
    yield runner
    runner.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is a POSIX signal")
def test_actions_cross_the_pipe_and_a_killed_trainer_fails_its_run_but_not_the_app(runner: ProcessRunner,
                                                                                  demo_dir: Path, tmp_path: Path):
    with pytest.raises(NothingToDo, match="nothing to save: start or train first"):
        runner.send(SaveNow())
    assert runner.pid is not None and not runner.running and not runner.live

    runner.send(TrainSteps(2, RunRequest(_spec(demo_dir, tmp_path / "paused"))))
    assert runner.running and runner.action == "train_steps"  # known when the call returns, not a poll later
    assert runner.join(TIMEOUT)
    assert runner.live and runner.paused and runner.step == 2
    with pytest.raises(AlreadyRunning, match="paused at step 2"):
        runner.start(RunRequest(_spec(demo_dir, tmp_path)))
    with pytest.raises(NothingToDo, match="no sample prompts"):
        runner.send(ValidateNow())
    runner.send(EndTraining())
    assert runner.join(TIMEOUT)
    events = runner.drain()
    assert [event.step for event in _of(events, Progress)] == [1, 2]
    assert [(f.status, f.step) for f in _of(events, RunFinished)] == [("stopped", 2)]
    assert Path(_of(events, RunFinished)[0].lora_path).is_file() and not runner.live and runner.step is None

    # The same process trains the next run; killed in the middle of it, the run fails and says how.
    first = runner.pid
    runner.start(RunRequest(_spec(demo_dir, tmp_path / "killed", "train.max_steps=1000")))
    assert runner.output_dir() == tmp_path / "killed" and runner.pid == first
    events = []
    deadline = time.monotonic() + TIMEOUT
    while not _of(events, Progress) and time.monotonic() < deadline:
        events += runner.drain()
        time.sleep(0.05)
    os.kill(first, signal.SIGKILL)
    assert runner.join(TIMEOUT) and not runner.live
    events += runner.drain()
    finished = _of(events, RunFinished)
    assert len(finished) == 1 and finished[0].status == "failed", finished
    assert "was killed by SIGKILL" in finished[0].message and "the app is fine" in finished[0].message

    # The next action gets a fresh trainer process, which answers (the app's Start path is test_app's).
    with pytest.raises(NothingToDo, match="nothing to save: start or train first"):
        runner.send(SaveNow())
    assert runner.pid not in (None, first) and not runner.running and not runner.live


def test_how_a_process_ended_in_words():
    assert describe_exit(-9).startswith("was killed by SIGKILL: the system may have run out of memory")
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert describe_exit(3) == "exited with code 3"


def test_a_trainer_process_that_cannot_start_says_why(demo_dir: Path, tmp_path: Path):
    runner = ProcessRunner(command=[sys.executable, "-c", "import sys; sys.exit('no torch here')"])
    with pytest.raises(NothingToDo, match=r"did not take 'start' \(it exited with code 1; its last words: no torch"):
        runner.start(RunRequest(_spec(demo_dir, tmp_path)))
    assert not runner.running and runner.spec is None
