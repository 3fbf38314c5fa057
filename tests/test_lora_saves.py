"""A LoRA file appears complete — weights and header — or not at all (issue 22, point 5): a save killed at any
rename, or failing on a full disk at any write, leaves no LoRA without its header; and a run repairs (or, when
nothing tells how it was made, removes) the header-less files earlier versions left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from trainer import lora_formats
from trainer.adapters import add_adapter
from trainer.checkpoint import (
    our_loras,
    remove_interrupted_writes,
    repair_incomplete_loras,
    save_lora_diffusers,
    save_lora_files,
    state_path,
)
from trainer.demo import demo_job_toml
from trainer.files import TEMP_SUFFIX
from trainer.spec import load_spec, save_spec

OURS = f"{lora_formats.METADATA_PREFIX}lora_format"
META = {"family": "flux2", "flavour": "demo", "steps": 225, "trigger_words": ["shapez"], "base_model": "demo",
        "spec_toml": "", "title": "demo_lora"}


@pytest.fixture(scope="module")
def adapted(demo_dir: Path) -> tuple[torch.nn.Module, type]:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(demo_dir / "flux2" / "transformer")
    add_adapter(transformer, "flux2", type="lora", rank=4, alpha=4.0, dropout=0.0, targets="all", init="default")
    return transformer, Flux2KleinPipeline


def _save(adapted: tuple, out: Path) -> None:
    save_lora_files(*adapted, out, "demo_lora", 225, ["diffusers", "comfyui"], META)


def _complete_or_absent(out: Path) -> list[str]:
    """Names of the LoRA files in `out` without our header (there must be none)."""
    return [p.name for p in our_loras(out, "demo_lora") if OURS not in lora_formats.read_metadata(p)]


class Fault(BaseException):
    """Stands for the process being killed: nothing after it runs (a BaseException: no handler catches it)."""


def test_a_save_killed_at_any_rename_leaves_no_lora_without_its_header(adapted, tmp_path, monkeypatch) -> None:
    real = os.replace
    for kill_at in range(1, 4):  # the header merge, the diffusers file's rename, the ComfyUI file's rename
        out, calls = tmp_path / f"killed-{kill_at}", []

        def replace(src, dst, kill_at=kill_at, calls=calls):  # noqa: ANN001, ANN202
            calls.append(dst)
            if len(calls) == kill_at:
                raise Fault
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Fault):
            _save(adapted, out)
        monkeypatch.setattr(os, "replace", real)
        assert _complete_or_absent(out) == [], (kill_at, calls)
        assert len(our_loras(out, "demo_lora")) == (kill_at > 2)  # the diffusers file is whole once renamed
        remove_interrupted_writes(out)  # what the next run does first
        assert not [p.name for p in out.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    _save(adapted, tmp_path / "whole")
    assert sorted(p.name for p in our_loras(tmp_path / "whole", "demo_lora")) == [
        "demo_lora-step000225.safetensors", "demo_lora-step000225_comfyui.safetensors"]
    assert _complete_or_absent(tmp_path / "whole") == []


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_full_disk_at_any_write_leaves_no_lora_without_its_header(adapted, tmp_path, monkeypatch, fail_at) -> None:
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError, match="No space left"):
        _save(adapted, tmp_path)
    assert _complete_or_absent(tmp_path) == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]  # cleaned up at once


def test_the_next_run_repairs_or_removes_loras_left_without_a_header(adapted, demo_dir, tmp_path) -> None:
    out = tmp_path / "out"
    for name in ("demo_lora-step000225.safetensors", "demo_lora.safetensors"):
        save_lora_diffusers(*adapted, out / name)  # what a save killed before its header left
    assert len(_complete_or_absent(out)) == 2
    job = tmp_path / "job.toml"
    job.write_text(demo_job_toml("flux2"), encoding="utf-8")
    save_spec(load_spec(job, ["output.name='demo_lora'"]), out / "job.resolved.toml")
    state_path(out, 250).parent.mkdir()
    state_path(out, 250).write_bytes(b"the final save writes its state first")
    (out / "notes.safetensors").write_bytes(b"not ours: left alone")

    repaired, removed = repair_incomplete_loras(out, "demo_lora")
    assert sorted(p.name for p in repaired) == ["demo_lora-step000225.safetensors", "demo_lora.safetensors"]
    assert removed == [] and _complete_or_absent(out) == []
    header = lora_formats.read_metadata(out / "demo_lora-step000225.safetensors")
    assert header["ss_steps"] == "225" and header[f"{lora_formats.METADATA_PREFIX}family"] == "flux2"
    assert header["ss_network_dim"] == "4" and "lora_adapter_metadata" in header
    assert lora_formats.read_metadata(out / "demo_lora.safetensors")["ss_steps"] == "250"

    bare = tmp_path / "no job"  # nothing tells how it was made: removed, a later save writes it again
    save_lora_diffusers(*adapted, bare / "demo_lora.safetensors")
    assert repair_incomplete_loras(bare, "demo_lora") == ([], [bare / "demo_lora.safetensors"])
    assert not (bare / "demo_lora.safetensors").exists() and (out / "notes.safetensors").exists()
