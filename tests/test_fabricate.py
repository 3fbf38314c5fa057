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
        check_disk_and_ram(0, 0, tmp_path, 26.0)


def test_a_rehearsal_counts_its_block_cache_in_the_disk_it_needs(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from bench.rehearse_job import check_disk_and_ram

    monkeypatch.setattr("shutil.disk_usage", lambda _path: Usage(100 * 2**30, 40 * 2**30, 60 * 2**30))
    check_disk_and_ram(48 * 2**30, 0, tmp_path, 1.0)  # the model alone fits
    with pytest.raises(UserError, match=r"rehearse: needs 72\.0 GiB of free disk in .* \(48\.0 GiB of fabricated "
                                        r"weights \+ 23\.0 GiB of block cache \+ 1 GiB left free\); it has 60\.0 GiB"):
        check_disk_and_ram(48 * 2**30, 23 * 2**30, tmp_path, 1.0)


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


def test_comfyui_fp8_files_hold_the_hub_weights_scaled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUX.2 dev's ComfyUI files are written as ComfyUI ships them: the blocks' and layers' Linear weights in fp8
    e4m3 with one scale each, Mistral cut after the 31 layers FLUX.2 reads. At the demo's shapes they are recognised
    as scaled fp8 and load to the hub folder's weights within fp8's rounding."""
    import torch

    from trainer.fabric import layouts
    from trainer.fabric.make import plan
    from trainer.families import family_ops
    from trainer.sources import ModelFiles
    from trainer.sources.recognise import recognise

    dev = registry.get_flavour("flux2", "dev")
    mistral = next(c for c in plan(dev, "comfy")[0] if c.name == "text_encoder")
    kept = {int(s.name.split(".")[2]) for s in layouts.file_specs(dev, mistral, "comfy") if ".layers." in s.name}
    assert kept == set(range(31)) and 47 < needed_bytes(dev, "comfy") / 2**30 < 49  # was 102.8 GiB in bf16
    monkeypatch.setitem(layouts.COMFY_FP8, ("flux2", "demo"), ("transformer", "text_encoder"))
    hub = fabricate(DEMO, "hub", tmp_path / "hub", small_encoders=True)
    comfy = fabricate(DEMO, "comfy", tmp_path / "comfy", small_encoders=True)
    for slot in ("transformer", "text_encoder"):
        found = recognise(comfy.files[slot])
        assert (found.fp8, found.scaled) == ("e4m3", True), slot
    ops = family_ops("flux2")
    want = ops.load_pipeline(str(hub.source), DEMO, torch.float32, skip=("vae",))
    got = ops.load_pipeline(str(comfy.source), DEMO, torch.float32, skip=("vae",),
                            files=ModelFiles(**{slot: str(path) for slot, path in comfy.files.items()}))
    for model in ("transformer", "text_encoder"):
        mine, theirs = getattr(got, model).state_dict(), getattr(want, model).state_dict()
        assert mine.keys() == theirs.keys()
        for name, value in theirs.items():  # e4m3 keeps 3 bits of mantissa: within 1/16 of each value
            torch.testing.assert_close(mine[name], value, rtol=1 / 16, atol=1e-6, msg=name)
