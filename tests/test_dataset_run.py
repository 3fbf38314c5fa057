"""The dataset layer inside a real run: aspect buckets, several resolutions, a bad file that never crashes it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer.events import LogMessage, Progress
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths


def _spec(demo_dir: Path, out: Path, dataset: Path, *overrides: str):  # noqa: ANN202
    base = ["train.max_steps=4", "sample.prompts=[]", f"output.dir='{out}'", f"data.datasets[0].path='{dataset}'",
            "output.save_state=false"]
    return resolve_paths(load_spec(demo_dir / "job.toml", base + list(overrides)), demo_dir)


def _images(folder: Path, size: tuple[int, int], count: int, start: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    for index in range(start, start + count):
        Image.new("RGB", size, (40 * index % 255, 90, 160)).save(folder / f"img_{index:02d}.png")
        (folder / f"img_{index:02d}.txt").write_text(f"picture number {index}")


def _run(spec) -> tuple[Session, list]:  # noqa: ANN001
    events: list = []
    session = Session(spec, emit=events.append)
    try:
        session.run()
    except BaseException:
        session.end()
        raise
    return session, events


def test_landscape_and_portrait_images_train_in_their_own_buckets(demo_dir: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    _images(dataset, (160, 96), 4)
    _images(dataset, (96, 160), 4, start=4)
    session, events = _run(_spec(demo_dir, tmp_path / "out", dataset, "data.resolution=128", "data.bucket_step=16"))
    try:
        buckets = sorted({item.bucket for item in session.items})
        assert buckets == [(96, 160), (160, 96)]
        shapes = {tuple(latents.shape[-2:]) for latents in session.latents}
        assert shapes == {(160 // 16, 96 // 16), (96 // 16, 160 // 16)}  # FLUX.2 latents: /8 then 2x2 patches
        assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]
        report = next(e.message for e in events if isinstance(e, LogMessage) and e.message.startswith("Buckets:"))
        assert "160x96" in report and "96x160" in report
    finally:
        session.end()


def test_several_resolutions_train_each_image_at_each(demo_dir: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    _images(dataset, (128, 128), 4)
    session, _ = _run(_spec(demo_dir, tmp_path / "out", dataset, "data.resolution=[64, 128]"))
    try:
        assert sorted(item.bucket for item in session.items) == [(64, 64)] * 4 + [(128, 128)] * 4
    finally:
        session.end()


def test_a_corrupt_image_among_good_ones_is_skipped_not_fatal(demo_dir: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    _images(dataset, (64, 64), 6)
    good = (dataset / "img_00.png").read_bytes()
    (dataset / "broken.png").write_bytes(good[: len(good) // 2])  # truncated mid-file
    (dataset / "notes.gif").write_bytes(b"GIF89a")  # an unsupported format is listed, not read
    session, events = _run(_spec(demo_dir, tmp_path / "out", dataset))
    try:
        assert "broken.png" not in {item.image_path.name for item in session.items}
        assert len(session.items) == 6
        warning = next(e.message for e in events if isinstance(e, LogMessage) and e.level == "warning")
        assert "broken.png" in warning and "notes.gif" in warning
        assert events[-1].status == "completed"
    finally:
        session.end()
