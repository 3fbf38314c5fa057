"""Run history (ui/run_history.py): the runs of the output folder with their status, steps, last loss, samples and
LoRA files, read from the events each run writes; Delete moves a run to the workdir's trash, never the running one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer.events import JsonlWriter, LoraSaved, Progress, RunFinished, RunStarted, SampleSaved
from trainer.folders import Folders, PathRefused
from ui.run_history import COLUMNS, History, follow, read_run


def write_run(root: Path, name: str, steps: int, max_steps: int, status: str | None, state: bool = False,
              written_in: Path | None = None) -> Path:
    """A run's folder as a run leaves it; `written_in`: where the run wrote it (an earlier run, moved since)."""
    folder = root / name
    (folder / "samples").mkdir(parents=True)
    writer = JsonlWriter(folder / "events.jsonl")
    written = written_in or folder
    writer(RunStarted(max_steps=max_steps, output_dir=str(written), family="flux2", flavour="demo"))
    for step in range(1, steps + 1):
        writer(Progress(step=step, max_steps=max_steps, loss=1.0 / step, learning_rate=1e-3, steps_per_second=5.0,
                        eta_seconds=1.0))
    sample = folder / "samples" / "step000002.png"
    sample.write_bytes(b"png")
    writer(SampleSaved(step=2, path=str(written / "samples" / sample.name), prompt="a photo"))
    (folder / f"{name}.safetensors").write_bytes(b"lora")
    writer(LoraSaved(step=steps, path=str(folder / f"{name}.safetensors")))
    if status:
        writer(RunFinished(status=status, step=steps))
    writer.close()
    if state:
        (folder / "state").mkdir()
        (folder / "state" / f"step{steps:06d}.safetensors").write_bytes(b"state")
    return folder


@pytest.fixture
def history(tmp_path: Path) -> History:
    root = tmp_path / "output"
    write_run(root, "done", 4, 4, "completed")
    write_run(root, "halted", 2, 10, "stopped", state=True)
    write_run(root, "crashed", 3, 10, None, state=True)  # the process died: no run_finished
    write_run(root, "live", 1, 10, None)
    write_run(root / "done" / "earlier_runs", "20261206-101010", 2, 4, "stopped", state=True,
              written_in=root / "done")  # written in done/, set aside by the later run
    (root / "not_a_run").mkdir()
    return History(Folders.of(tmp_path), root)


def test_each_run_is_listed_with_its_status_steps_and_loss_the_live_one_first(history):
    runs = history.runs(live_dir=history.root / "live")
    assert [run.name for run in runs][0] == "live"
    by_name = {run.name: run for run in runs}
    assert set(by_name) == {"done", "halted", "crashed", "live", "done/earlier_runs/20261206-101010"}
    assert by_name["done/earlier_runs/20261206-101010"].status == "stopped"
    assert not by_name["done/earlier_runs/20261206-101010"].resumable  # its job's output.dir is the later run's
    assert [label for _, label in by_name["done/earlier_runs/20261206-101010"].samples()] == ["step 2: a photo"]
    assert [by_name[name].status for name in ("done", "halted", "crashed", "live")] == [
        "finished", "stopped", "failed", "running"]
    assert by_name["crashed"].detail.startswith("it ended without a result")
    row = dict(zip(COLUMNS, by_name["halted"].row(), strict=True))
    assert row["flavour"] == "flux2/demo" and row["steps"] == "2 / 10" and row["last loss"] == "0.5000"
    assert [by_name[name].resumable for name in ("done", "halted", "crashed", "live")] == [False, True, True, False]
    assert by_name["done"].loras == [history.root / "done" / "done.safetensors"]
    os.symlink(history.root.parent / "secret.safetensors", history.root / "done" / "link.safetensors")
    (history.root.parent / "secret.safetensors").write_bytes(b"not a download")
    assert read_run(history.root / "done").loras == [history.root / "done" / "done.safetensors"]  # a link: never
    assert [label for _, label in by_name["done"].samples()] == ["step 2: a photo"]
    assert [row["series"] for row in by_name["done"].view.loss_rows()][:2] == ["loss", "smoothed"]


def test_delete_moves_a_run_to_the_trash_and_refuses_the_running_one(history, tmp_path):
    moved = history.trash("halted")
    assert moved.parent == tmp_path / "trash" and (moved / "halted.safetensors").is_file()
    assert not (history.root / "halted").exists()
    assert "halted" not in [run.name for run in history.runs()]
    with pytest.raises(PathRefused, match="live is running; stop it before deleting it"):
        history.trash("live", live_dir=history.root / "live")
    with pytest.raises(PathRefused, match="is not a run in"):
        history.trash("../output")
    assert history.trash("done/earlier_runs/20261206-101010").name.startswith("done_earlier_runs_20261206-101010-")


def test_resume_from_the_history_starts_the_run_with_the_job_it_ran(tmp_path):
    from test_ui_state import FakeRunner

    from trainer.spec import parse_spec
    from ui import form
    from ui.jobs import write_job
    from ui.studio import Studio

    runner = FakeRunner()
    studio = Studio(runner, tmp_path)
    folder = write_run(tmp_path / "output", "halted", 2, 10, "stopped", state=True)
    job = form.default_job(tmp_path)
    job["output"].update(dir=str(folder), name="halted")
    job["train"]["max_steps"] = 10
    write_job(parse_spec(job), folder / "job.resolved.toml")
    values, hidden, outcome = studio.run_job("halted")
    assert outcome.ok and values["output.dir"] == str(folder) and values["train.max_steps"] == 10
    assert studio.start(values, hidden, resume=True).ok
    assert runner.started[0][0].output.dir == str(folder)
    assert studio.history.runs(studio.live_output_dir())[0].status == "running"  # the live run, first
    assert not studio.run_job("nothing")[2].ok


def test_a_growing_events_file_is_read_from_where_it_was_left(tmp_path):
    folder = write_run(tmp_path, "live", 2, 10, None)
    tail = follow(folder / "events.jsonl")
    assert tail.view.step == 2
    with open(folder / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"event": "progress", "step": 3, "max_steps": 10, "loss": 0.1, "learning_rate": 0.001, '
                     '"steps_per_second": 1.0, "eta_seconds": 1.0, "time": 1.0}\n{"event": "progr')  # half a line
    offset = tail.offset
    assert follow(folder / "events.jsonl", tail) is tail and tail.view.step == 3 and tail.view.loss == 0.1
    assert tail.offset > offset and (folder / "events.jsonl").stat().st_size > tail.offset  # the half line waits
    (folder / "events.jsonl").unlink()  # a new run moved it aside and starts its own
    write_run(tmp_path / "again", "live", 1, 5, None)
    (tmp_path / "again" / "live" / "events.jsonl").rename(folder / "events.jsonl")
    fresh = follow(folder / "events.jsonl", tail)
    assert fresh is not tail and (fresh.view.step, fresh.view.max_steps) == (1, 5)
