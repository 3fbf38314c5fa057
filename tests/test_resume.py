"""Exact resume: a run interrupted halfway and resumed ends with the same LoRA and losses as an unbroken one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import saved_states
from trainer.demo import DEMO_RANK
from trainer.errors import UserError
from trainer.events import Progress
from trainer.runners.base import Commands
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths

STEPS = 8
# Dropouts make the run depend on every RNG the state must carry.
SETTINGS = [f"train.max_steps={STEPS}", "output.save_every_steps=4", "sample.prompts=[]", "lora.dropout=0.1",
            "data.caption_dropout=0.3", "train.scheduler='cosine'", "train.warmup_steps=2", "train.learning_rate=0.01",
            "advanced.tread=true"]


class SimulatedCrash(Exception):
    pass


def _spec(demo_dir: Path, out: Path, *extra: str):  # noqa: ANN202
    return resolve_paths(load_spec(demo_dir / "job.toml", [*SETTINGS, f"output.dir='{out}'", *extra]), demo_dir)


def _run(spec, resume: bool = False, crash_at: int | None = None, stop_at: int | None = None) -> Session:  # noqa: ANN001
    commands = Commands()

    def emit(event) -> None:  # noqa: ANN001
        if isinstance(event, Progress) and event.step == crash_at:
            raise SimulatedCrash
        if isinstance(event, Progress) and event.step == stop_at:
            commands.request_stop()

    session = Session(spec, emit=emit, commands=commands, resume=resume)
    try:
        session.run()
    finally:
        session.end()
    return session


@pytest.fixture(scope="module")
def straight(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict]:
    out = tmp_path_factory.mktemp("straight")
    session = _run(_spec(demo_dir, out))
    return session.losses, load_file(out / "demo_lora.safetensors")


def _assert_same(resumed: Session, out: Path, straight: tuple[list[float], dict]) -> None:
    losses, weights = straight
    assert resumed.step == STEPS
    assert resumed.losses == pytest.approx(losses, abs=1e-6, rel=0)
    again = load_file(out / "demo_lora.safetensors")
    assert again.keys() == weights.keys()
    for key in weights:
        torch.testing.assert_close(again[key], weights[key], rtol=0, atol=1e-6)


def test_crash_then_resume_matches_an_unbroken_run(demo_dir: Path, tmp_path: Path, straight) -> None:  # noqa: ANN001
    spec = _spec(demo_dir, tmp_path)
    with pytest.raises(SimulatedCrash):
        _run(spec, crash_at=6)  # dies after the state of step 4 was written
    assert [step for step, _ in saved_states(tmp_path)] == [4]
    _assert_same(_run(spec, resume=True), tmp_path, straight)


def test_stop_then_resume_matches_an_unbroken_run(demo_dir: Path, tmp_path: Path, straight) -> None:  # noqa: ANN001
    spec = _spec(demo_dir, tmp_path)
    stopped = _run(spec, stop_at=3)
    assert stopped.step == 3 and [step for step, _ in saved_states(tmp_path)] == [3]
    _assert_same(_run(spec, resume=True), tmp_path, straight)


def test_keep_last_prunes_old_states_and_loras(demo_dir: Path, tmp_path: Path) -> None:
    _run(_spec(demo_dir, tmp_path, "train.max_steps=6", "output.save_every_steps=1", "output.keep_last=2"))
    assert [step for step, _ in saved_states(tmp_path)] == [5, 6]
    assert sorted(p.name for p in tmp_path.glob("demo_lora-step*.safetensors")) == [
        "demo_lora-step000004.safetensors", "demo_lora-step000005.safetensors"]

    # A new run in the same folder sets the earlier one aside whole, so neither its LoRA is overwritten nor its
    # states mixed with the new ones (resume would take the newest step, the earlier run's).
    earlier = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
               and "cache" not in p.parts}
    _run(_spec(demo_dir, tmp_path, "train.max_steps=2", "train.warmup_steps=1", "output.save_every_steps=1"))
    assert [step for step, _ in saved_states(tmp_path)] == [1, 2]
    (aside,) = (tmp_path / "earlier_runs").iterdir()
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == earlier
    assert '"max_steps": 6' not in (tmp_path / "events.jsonl").read_text()


def test_resume_refuses_a_changed_adapter_or_a_missing_state(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no saved training state"):
        _run(_spec(demo_dir, tmp_path), resume=True)
    _run(_spec(demo_dir, tmp_path, "train.max_steps=2", "train.warmup_steps=1"))
    with pytest.raises(UserError, match=r"\[lora\] settings differ"):
        _run(_spec(demo_dir, tmp_path, f"lora.rank={2 * DEMO_RANK}"), resume=True)


def test_a_new_run_that_fails_before_its_first_step_moves_nothing(demo_dir: Path, tmp_path: Path) -> None:
    from trainer.events import PhaseChanged

    _run(_spec(demo_dir, tmp_path, "train.max_steps=2", "train.warmup_steps=1"))
    earlier = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
               and "cache" not in p.parts}

    def fail_while_loading(event) -> None:  # noqa: ANN001 - as an offline download or a damaged model would
        if isinstance(event, PhaseChanged) and event.phase == "loading":
            raise SimulatedCrash

    session = Session(_spec(demo_dir, tmp_path, "train.max_steps=3"), emit=fail_while_loading)
    with pytest.raises(SimulatedCrash):
        try:
            session.run()
        finally:
            session.end()
    assert not (tmp_path / "earlier_runs").exists()
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
            and "cache" not in p.parts} == earlier
