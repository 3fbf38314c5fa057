"""Faults a user meets: the trainer killed (kill -9) between steps or mid-save, a disk that fills during a save,
an output folder that cannot be written. Nothing saved before is lost, the run resumes, the app lives on."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from fault_child import run_until
from safetensors.torch import load_file
from test_resume import SETTINGS, _assert_same, _spec
from test_resume import _run as run_session

from trainer.checkpoint import load_training_state, saved_states
from trainer.events import JsonlWriter, LogMessage, Progress, RunFinished
from trainer.runners.base import RunRequest
from trainer.runners.launch import EventsFollower
from trainer.runners.thread import TrainingRunner

EVERY_2 = "output.save_every_steps=2"


@pytest.fixture(scope="module")
def unbroken(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict]:
    """The resume tests' run, never interrupted: what every resumed run must end with."""
    out = tmp_path_factory.mktemp("unbroken")
    session = run_session(_spec(demo_dir, out))
    return session.losses, load_file(out / "demo_lora.safetensors")


def _kill_at(point: str, demo_dir: Path, out: Path, resume: bool = False) -> None:
    """Train the resume tests' job headless (`python -m trainer train`) in a child until `point` (see
    fault_child.py), then SIGKILL it. The child is a fork of this process: the CLI's own code, without paying
    torch's import (~10 s of CPU) per kill."""
    marker = out.parent / f"{out.name}.blocked"
    marker.unlink(missing_ok=True)
    overrides = [arg for setting in [*SETTINGS, EVERY_2, f"output.dir='{out}'"] for arg in ("--set", setting)]
    args = ["train", str(demo_dir / "job.toml"), "--no-progress", *overrides, *(["--resume"] if resume else [])]
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            code = run_until(str(marker), point, args)
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            assert not done, f"the run ended (status {status}) before {point}"
            assert time.monotonic() < deadline, f"the run never reached {point}"
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _every_state_loads(out: Path) -> list[int]:
    states = saved_states(out)
    for step, path in states:
        assert load_training_state(path)["step"] == step
    return [step for step, _ in states]


def _torn(out: Path) -> list[Path]:
    return [p for p in [*out.iterdir(), *(out / "state").iterdir()] if p.name.endswith(".tmp")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX) to run the CLI in a child cheaply")
def test_kill_9_mid_write_and_between_steps_resumes_to_the_unbroken_run(demo_dir: Path, tmp_path: Path,
                                                                        unbroken) -> None:  # noqa: ANN001
    """A machine that dies three times (saves every 2 of 8 steps); each time the last good files load."""
    _kill_at("write:state/step000004", demo_dir, tmp_path)  # inside the state write of step 4
    torn = _torn(tmp_path)
    assert [p.parent.name for p in torn] == ["state"] and ".step000004.safetensors." in torn[0].name
    assert _every_state_loads(tmp_path) == [2]
    assert load_file(tmp_path / "demo_lora-step000002.safetensors")
    assert not (tmp_path / "demo_lora-step000004.safetensors").exists()  # the state is written before the LoRA

    _kill_at("progress:5", demo_dir, tmp_path, resume=True)  # between steps 5 and 6
    assert not torn[0].exists()  # the resumed run cleared the half-written file
    assert _every_state_loads(tmp_path) == [2, 4]
    assert load_file(tmp_path / "demo_lora-step000004.safetensors")
    events = EventsFollower(tmp_path / "events.jsonl").read()
    assert [e.step for e in events if isinstance(e, Progress)][-3:] == [3, 4, 5]

    _kill_at("write:demo_lora-step000006", demo_dir, tmp_path, resume=True)  # inside the LoRA write of step 6
    assert [p.name.startswith(".demo_lora-step000006.safetensors.") for p in _torn(tmp_path)] == [True]
    assert _every_state_loads(tmp_path)[-1] == 6 and not (tmp_path / "demo_lora-step000006.safetensors").exists()

    (tmp_path / "state" / "step000007.safetensors").write_bytes(b"\0" * 64)  # a newer state a lying disk tore
    resumed = run_session(_spec(demo_dir, tmp_path, EVERY_2), resume=True)
    _assert_same(resumed, tmp_path, unbroken)  # from step 6, the newest state that reads
    assert not _torn(tmp_path)
    warnings = [e.message for e in EventsFollower(tmp_path / "events.jsonl").read() if isinstance(e, LogMessage)
                and e.level == "warning"]
    assert any("step000007.safetensors: the saved training state cannot be read" in w for w in warnings)


def test_events_after_a_line_torn_by_a_kill_stay_readable(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text('{"event": "log", "level": "info", "message": "whole"}\n{"event": "progr', encoding="utf-8")
    writer = JsonlWriter(log)
    writer(LogMessage(level="info", message="after the restart"))
    writer.close()
    assert [e.message for e in EventsFollower(log).read()] == ["whole", "after the restart"]


# ---------------------------------------------------------------------- a full disk, a folder we cannot write


def _fill_disk_during(monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    """safetensors' writer (LoRA files, states) fails halfway with ENOSPC on the first file whose name holds
    `written`, leaving half a temporary file as a real full disk would."""
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        real_save(tensors, filename, metadata=metadata)
        if written in Path(filename).name:
            os.truncate(filename, os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _runner_spec(demo_dir: Path, out: Path, *extra: str):  # noqa: ANN202
    return _spec(demo_dir, out, "train.max_steps=4", "output.save_every_steps=2", *extra)


def _finish(runner: TrainingRunner) -> list:
    assert runner.join(120), f"the action {runner.action} did not finish"
    return runner.drain()


def test_disk_full_during_a_save_names_the_folder_keeps_files_and_resumes(demo_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fill_disk_during(monkeypatch, "demo_lora.safetensors")  # the final LoRA, after step 4's state
    runner = TrainingRunner()
    runner.start(RunRequest(_runner_spec(demo_dir, tmp_path)))
    finished = [e for e in _finish(runner) if isinstance(e, RunFinished)]
    assert [f.status for f in finished] == ["failed"]
    message = finished[0].message
    assert f"cannot save in '{tmp_path}' at step 4: the disk is full" in message
    assert "files saved before are intact" in message and "step000004.safetensors: resume from it" in message
    assert "Traceback" not in message and not runner.live
    assert not (tmp_path / "demo_lora.safetensors").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no half file left behind
    assert load_file(tmp_path / "demo_lora-step000002.safetensors")
    assert _every_state_loads(tmp_path) == [2, 4]

    monkeypatch.undo()  # space freed: the same runner resumes and writes the LoRA
    runner.start(RunRequest(_runner_spec(demo_dir, tmp_path), resume=True))
    assert [(f.status, f.step) for f in _finish(runner) if isinstance(f, RunFinished)] == [("completed", 4)]
    assert load_file(tmp_path / "demo_lora.safetensors")


def test_an_output_folder_that_cannot_be_written_is_named(demo_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # permissions do not bind root: refuse creating files there as the OS would
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args: object, dir: str | os.PathLike | None = None, **kwargs: object):  # noqa: A002, ANN202
            if dir is not None and Path(dir) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    runner = TrainingRunner()
    try:
        runner.start(RunRequest(_runner_spec(demo_dir, locked)))
        finished = [e for e in _finish(runner) if isinstance(e, RunFinished)]
    finally:
        locked.chmod(0o755)
    assert [f.status for f in finished] == ["failed"]
    # preflight's os.access check names it for users; the session's real write probe for root (and file systems
    # os.access misjudges)
    assert finished[0].message.startswith(f"output.dir: cannot write to '{locked}'") or finished[0].message == (
        f"output.dir: cannot write in '{locked}' (Permission denied); choose a folder you can write to, or fix its "
        "permissions")
    assert not runner.live and list(locked.iterdir()) == []


# ---------------------------------------------------------------------- nan weights and out of memory, in the app


def test_the_runner_lives_through_nan_weights_and_out_of_memory(demo_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trainer.families import flux2

    real_predict = flux2.predict
    fault = {"at_call": 0, "kind": ""}

    def predict(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        fault["at_call"] -= 1
        prediction = real_predict(*args, **kwargs)
        if fault["at_call"] == 0 and fault["kind"] == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if fault["at_call"] == 0 and fault["kind"] == "nan":  # a finite loss whose gradients are nan
            return torch.where(torch.ones_like(prediction, dtype=torch.bool), prediction, prediction * float("inf"))
        return prediction

    monkeypatch.setattr(flux2, "predict", predict)
    runner = TrainingRunner()
    spec = _runner_spec(demo_dir, tmp_path)

    fault.update(at_call=4, kind="nan")  # step 4's update makes the weights nan; its save must not keep them
    runner.start(RunRequest(spec))
    finished = [e for e in _finish(runner) if isinstance(e, RunFinished)]
    assert [(f.status, f.step) for f in finished] == [("failed", 4)]
    assert "the LoRA weights became nan or inf by step 4" in finished[0].message
    assert all(hint in finished[0].message for hint in ("train.learning_rate", "train.max_grad_norm", "bf16"))
    assert _every_state_loads(tmp_path) == [2] and not (tmp_path / "demo_lora.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "demo_lora-step000002.safetensors").values())

    fault.update(at_call=1, kind="oom")  # the first step after resuming, step 3
    runner.start(RunRequest(spec, resume=True))
    finished = [e for e in _finish(runner) if isinstance(e, RunFinished)]
    assert [(f.status, f.step) for f in finished] == [("failed", 2)]
    assert "out of memory at step 3" in finished[0].message and "lowvram.strategy" in finished[0].message
    assert "state of step 2 is saved" in finished[0].message and not runner.live

    fault.update(kind="")  # the setting changed: the same runner resumes and completes
    runner.start(RunRequest(spec, resume=True))
    assert [(f.status, f.step) for f in _finish(runner) if isinstance(f, RunFinished)] == [("completed", 4)]
    assert load_file(tmp_path / "demo_lora.safetensors")
