"""What a person watching a run sees: memory and timing per step, evaluation loss, trackers, readable failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.errors import UserError
from trainer.events import EvalLoss, Progress, RunFinished
from trainer.session import Session
from trainer.spec import SpecError, load_spec, resolve_paths


def _spec(demo_dir: Path, out: Path, *overrides: str):  # noqa: ANN202
    base = ["train.max_steps=4", "sample.prompts=[]", f"output.dir='{out}'"]
    return resolve_paths(load_spec(demo_dir / "job.toml", base + list(overrides)), demo_dir)


def _run(spec, resume: bool = False) -> tuple[Session, list]:  # noqa: ANN001
    events: list = []
    session = Session(spec, emit=events.append, resume=resume)
    try:
        session.run()
    finally:
        session.end()
    return session, events


def test_progress_reports_step_time_and_memory(demo_dir: Path, tmp_path: Path) -> None:
    _, events = _run(_spec(demo_dir, tmp_path))
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(progress) == 4
    assert all(e.step_seconds > 0 and e.ram_gib > 0.1 and e.eta_seconds >= 0 for e in progress)
    assert progress[-1].eta_seconds == 0


def test_eval_loss_is_stable_and_uses_held_out_images(demo_dir: Path, tmp_path: Path) -> None:
    spec = _spec(demo_dir, tmp_path, "data.eval_holdout=2", "train.eval_every_steps=2", "train.learning_rate=1e-12")
    session, events = _run(spec)
    evals = [e for e in events if isinstance(e, EvalLoss)]
    assert [e.step for e in evals] == [2, 4]
    # With a learning rate of ~0 the model does not change, so fixed noise gives the same evaluation loss.
    assert evals[0].loss == pytest.approx(evals[1].loss, rel=1e-6)
    held_out = {session.items[i].image_path.name for i in session.eval_indices}
    assert held_out == {"shape_10.png", "shape_11.png"}


def test_eval_without_held_out_images_is_refused(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="train.eval_every_steps: the evaluation loss needs held-out images"):
        _spec(demo_dir, tmp_path, "train.eval_every_steps=2")


def test_out_of_memory_saves_state_names_settings_and_resumes(demo_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(demo_dir, tmp_path, "train.learning_rate=0.01")
    straight_dir = tmp_path / "straight"
    _run(spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(straight_dir)})}))

    from trainer.families import flux2

    real_predict = flux2.predict
    calls = {"n": 0}

    def predict_then_oom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:  # the third step
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(flux2, "predict", predict_then_oom)
    with pytest.raises(UserError) as caught:
        _run(spec)
    message = str(caught.value)
    assert "out of memory at step 3" in message and "lowvram.strategy" in message
    assert "train.batch_size" in message and "state of step 2 is saved" in message
    finished = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert finished["event"] == "run_finished" and finished["status"] == "failed"

    monkeypatch.setattr(flux2, "predict", real_predict)
    _run(spec, resume=True)
    resumed, straight = load_file(tmp_path / "demo_lora.safetensors"), load_file(straight_dir / "demo_lora.safetensors")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


def test_nan_loss_stops_at_once_with_advice(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.families import flux2

    real_predict = flux2.predict
    monkeypatch.setattr(flux2, "predict", lambda *a, **k: real_predict(*a, **k) * float("nan"))
    events: list = []
    session = Session(_spec(demo_dir, tmp_path), emit=events.append)
    with pytest.raises(UserError, match="the loss became nan at step 1.*train.learning_rate") as caught:
        session.run()
    session.end()
    assert "train.max_grad_norm" in str(caught.value) and "bf16 instead of fp16" in str(caught.value)
    assert not [e for e in events if isinstance(e, Progress)] and session.step == 0  # at once: no step taken
    assert not list(tmp_path.glob("*.safetensors"))  # nothing trained on nan is saved


def test_tensorboard_logs_loss_per_step(demo_dir: Path, tmp_path: Path) -> None:
    _run(_spec(demo_dir, tmp_path, 'output.log_with=["tensorboard"]'))
    logs = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert logs, "no TensorBoard event file written"
    import struct

    from tensorboardX.proto import event_pb2  # the reader side of the same format

    steps = []
    for log in logs:
        data = log.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            steps += [event.step for value in event.summary.value if value.tag == "loss"]
    assert sorted(steps) == [1, 2, 3, 4]


def test_missing_tracker_is_named(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(UserError, match="output.log_with: 'wandb' is not installed"):
        _run(_spec(demo_dir, tmp_path, 'output.log_with=["wandb"]'))
    assert RunFinished  # the failure is reported as an event too (checked in the OOM test)
