"""The fabricator's bad input: not enough disk or RAM stops it before anything is written, with what it needs and
has; a fabricate killed halfway leaves no folder a later run would take for a model."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from trainer import registry
from trainer.errors import UserError
from trainer.fabric.make import MARKER, existing, fabricate, needed_bytes

DEMO = registry.get_flavour("flux2", "demo")
Usage = namedtuple("Usage", "total used free")


def test_not_enough_disk_stops_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.disk_usage", lambda _path: Usage(10 * 2**30, 10 * 2**30, 2**29))
    need = needed_bytes(DEMO, "hub", small_encoders=True)
    with pytest.raises(UserError, match=rf"fabricate: needs {(need + 2**30) / 2**30:.1f} GiB of free disk in .*; it "
                                        r"has 0\.5 GiB\. Free some space or choose another --out"):
        fabricate(DEMO, "hub", tmp_path / "demo", small_encoders=True)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_ram_stops_a_rehearsal_before_it_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import psutil

    from bench.rehearse_job import check_disk_and_ram

    monkeypatch.setattr(psutil, "virtual_memory", lambda: namedtuple("Memory", "available")(8 * 2**30))
    with pytest.raises(UserError, match=r"rehearse: the run needs 26\.0 GiB of RAM at its peak .* this machine has "
                                        r"8\.0 GiB available"):
        check_disk_and_ram(0, tmp_path, 26.0)


def test_a_killed_fabricate_leaves_nothing_a_later_run_trusts(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.fabric import layouts

    out = tmp_path / "demo"
    real_write = layouts.write_file

    def killed(path: Path, *args: object, **kwargs: object) -> int:
        real_write(path, *args, **kwargs)
        raise KeyboardInterrupt  # the first weights file is on disk when the run is stopped

    monkeypatch.setattr(layouts, "write_file", killed)
    with pytest.raises(KeyboardInterrupt):
        fabricate(DEMO, "hub", out, small_encoders=True)
    assert not out.exists() and existing(out, DEMO, "hub", 0) is None
    assert (tmp_path / ".demo.partial").is_dir()  # named as unfinished, beside the target
    monkeypatch.undo()
    made = fabricate(DEMO, "hub", out, small_encoders=True)
    assert (out / MARKER).is_file() and not (tmp_path / ".demo.partial").exists()
    assert existing(out, DEMO, "hub", 0).folder == made.folder == out
    assert existing(out, DEMO, "comfy", 0) is None  # another layout is not this folder
    with pytest.raises(UserError, match="already exists"):
        fabricate(DEMO, "hub", out, small_encoders=True)
