"""A full disk: one message naming the folder, the space the save needs and what is free; events.jsonl stays whole;
the earlier saved state still resumes. The disk is a small tmpfs, filled for real by the demo run."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer.__main__ import main


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    # One save of the demo job fits (its LoRA 0.45 MB and training state 1.4 MB), not a second beside it
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip("needs permission to mount a 3 MiB tmpfs (root) to fill a disk for real")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _train(demo_dir: Path, out: Path, *sets: str) -> int:
    args = ["train", str(demo_dir / "job.toml"), "--no-progress", "--set", f"output.dir='{out}'",
            "--set", "sample.prompts=[]"]
    for item in sets:
        args += ["--set", item]
    return main(args)


def _whole_lines(events: Path) -> list[dict]:
    text = events.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line parses: none torn


def test_a_full_disk_during_a_save_names_the_folder_and_the_space_and_the_state_resumes(
        demo_dir: Path, small_disk: Path, capsys) -> None:
    out = small_disk / "out"
    assert _train(demo_dir, out, "train.max_steps=40", "output.save_every_steps=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot save in '{out}' at step ") and "Traceback" not in err
    assert re.search(r"the disk is full: this save needs about [\d.]+ [KM]iB and [\d.]+ [KM]iB is free there; free "
                     r"some space", err), err
    state = err.split("the last saved state is ")[1].split(": resume")[0]
    step = int(Path(state).stem.removeprefix("step"))
    assert Path(state).is_file() and _whole_lines(out / "events.jsonl")
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporaries left behind
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    assert main(["train", str(demo_dir / "job.toml"), "--no-progress", "--resume", "--set", f"output.dir='{out}'",
                 "--set", "sample.prompts=[]", "--set", f"train.max_steps={step + 2}"]) == 0
    assert f"resumed from {state} at step {step}" in capsys.readouterr().out


def test_a_full_disk_between_saves_gives_the_same_message_and_a_whole_events_file(demo_dir: Path, small_disk: Path,
                                                                                  capsys) -> None:
    import shutil

    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 8192))  # room for the job and a few events
    out = small_disk / "out"
    assert _train(demo_dir, out, "train.max_steps=40", "output.save_every_steps=0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot write in '{out}' at step ") and "the disk is full: " in err
    events = _whole_lines(out / "events.jsonl")
    assert events[0]["event"] == "run_started" and events[-1]["event"] != "run_finished"  # cut at the last whole one
