"""Disk caches: reused across runs while inputs are unchanged, recomputed when one changes, never read torn."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from PIL import Image

from trainer.data.disk_cache import DiskCache, cache_key
from trainer.events import LogMessage, PhaseChanged
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths


def _spec(demo_dir: Path, out: Path, cache: Path, *overrides: str, dataset: Path | None = None):  # noqa: ANN202
    base = ["train.max_steps=1", "sample.prompts=['<token> a blue square']", f"output.dir='{out}'",
            "data.cache_latents='disk'", "data.cache_text_embeddings='disk'", f"data.cache_dir='{cache}'"]
    if dataset is not None:
        base.append(f"data.datasets[0].path='{dataset}'")
    return resolve_paths(load_spec(demo_dir / "job.toml", base + list(overrides)), demo_dir)


def _setup(spec) -> tuple[Session, list]:  # noqa: ANN001
    events: list = []
    session = Session(spec, emit=events.append)
    session.setup()
    return session, events


def _cache_line(events: list) -> str:
    return next(e.message for e in events if isinstance(e, LogMessage) and e.message.startswith("caches:"))


def test_second_run_reuses_everything_and_skips_the_text_encoder(demo_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, first_events = _setup(_spec(demo_dir, tmp_path / "a", cache))
    latents = [t.clone() for t in first.latents]
    text = first.text_cache["shapez a blue square"]["prompt_embeds"].clone()
    first.end()
    assert "0 reused" in _cache_line(first_events)

    second, events = _setup(_spec(demo_dir, tmp_path / "b", cache))
    try:
        assert second.pipe.text_encoder is None, "the text encoder was loaded although every embedding was cached"
        assert _cache_line(events) == "caches: text: 14 reused, 0 computed; latents: 12 reused, 0 computed"
        assert any(isinstance(e, PhaseChanged) and "text encoders not needed" in e.detail for e in events)
        assert all(torch.equal(a, b) for a, b in zip(latents, second.latents, strict=True))
        assert torch.equal(second.text_cache["shapez a blue square"]["prompt_embeds"], text)
        second.train(1)  # trains from the cached inputs alone
    finally:
        second.end()


def test_a_changed_image_or_caption_is_recomputed(demo_dir: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    shutil.copytree(demo_dir / "dataset", dataset)
    cache = tmp_path / "cache"
    _setup(_spec(demo_dir, tmp_path / "a", cache, dataset=dataset))[0].end()
    image = Image.open(dataset / "shape_00.png")
    image.putpixel((3, 3), (1, 2, 3))
    image.save(dataset / "shape_00.png")  # new content under an old name
    (dataset / "shape_02.txt").write_text("a brand new caption")
    session, events = _setup(_spec(demo_dir, tmp_path / "b", cache, dataset=dataset))
    session.end()
    assert _cache_line(events) == "caches: text: 13 reused, 1 computed; latents: 11 reused, 1 computed"


def test_a_different_precision_is_a_different_entry(demo_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _setup(_spec(demo_dir, tmp_path / "a", cache))[0].end()
    session, events = _setup(_spec(demo_dir, tmp_path / "b", cache, "model.text_encoder_precision='bf16'"))
    session.end()
    assert _cache_line(events).startswith("caches: text: 0 reused, 14 computed; latents: 12 reused")


def test_torn_or_corrupt_entries_are_never_read(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    key = cache_key(kind="x", n=1)
    cache.put(key, {"t": torch.arange(4.0)})
    assert torch.equal(cache.get(key)["t"], torch.arange(4.0))
    path = next(tmp_path.rglob(f"{key}.safetensors"))
    path.write_bytes(path.read_bytes()[:20])  # as if the disk lost the end of the file
    assert cache.get(key) is None and not path.exists()
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"
