"""Dataset health: every problem a folder can have, found before training, with the right verdict."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.health import check_datasets
from trainer.data.health_report import usable_images
from trainer.spec import DatasetEntry, JobSpec


def _image(path: Path, size: tuple[int, int] = (96, 96), colour: tuple[int, int, int] = (90, 120, 150),
           caption: str | None = "a photo") -> Path:
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def _distinct(index: int) -> tuple[int, int, int]:
    """Colours far enough apart that plain images of them are different pictures, not likely duplicates."""
    return (index * 53 + 17) % 256, (index * 97 + 29) % 256, (index * 151 + 41) % 256


def _truncated_jpeg(path: Path) -> Path:
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (96, 96), bytes(rng.randrange(256) for _ in range(96 * 96 * 3)))
    noise.save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    path.with_suffix(".txt").write_text("a photo")
    return path


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A dataset folder with one of every problem, and two good images."""
    folder = tmp_path / "subject"
    folder.mkdir()
    _image(folder / "good_a.png", colour=(200, 10, 10))
    _image(folder / "good_b.jpg", colour=(10, 200, 10))
    shutil.copy(folder / "good_a.png", folder / "z_copy_of_a.png")
    (folder / "z_copy_of_a.txt").write_text("a photo")
    _truncated_jpeg(folder / "cut.jpg")
    (folder / "garbage.webp").write_bytes(b"RIFF....WEBPVP8 not really")
    _image(folder / "tiny.png", size=(40, 40), colour=(1, 2, 3))
    _image(folder / "no_caption.png", colour=(5, 5, 250), caption=None)
    _image(folder / "empty_caption.bmp", colour=(250, 250, 5), caption="  \n")
    Image.new("RGB", (8, 8)).save(folder / "animation.gif")
    (folder / "notes.md").write_text("shoot notes")
    (folder / "orphan.txt").write_text("a caption for nothing")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "more").mkdir()
    return folder


def _rows(report, name: str) -> list:
    return [row for row in report.rows if row.file.name == name]


def test_every_problem_is_found_and_the_run_can_still_go_ahead(messy: Path) -> None:
    report = check_datasets([DatasetEntry(path=str(messy))], min_size=64, batch_size=1)

    assert report.verdict == "warnings"
    (cut,) = _rows(report, "cut.jpg")
    assert "truncated" in cut.problem and cut.skipped and cut.severity == "warning"
    (garbage,) = _rows(report, "garbage.webp")
    assert "cannot read" in garbage.problem and garbage.skipped
    (tiny,) = _rows(report, "tiny.png")
    assert "40x40 is below the minimum size" in tiny.problem and tiny.skipped
    (no_caption,) = _rows(report, "no_caption.png")
    assert "no caption file" in no_caption.problem and not no_caption.skipped
    (empty,) = _rows(report, "empty_caption.bmp")
    assert "is empty" in empty.problem and not empty.skipped
    (duplicate,) = _rows(report, "z_copy_of_a.png")
    assert "same file as subject/good_a.png" in duplicate.problem
    assert "convert it to PNG or JPEG" in _rows(report, "animation.gif")[0].problem
    assert "ignored" in _rows(report, "notes.md")[0].problem
    assert "no image of the same name" in _rows(report, "orphan.txt")[0].problem
    assert "not searched" in _rows(report, "more")[0].problem
    assert not _rows(report, ".DS_Store")
    assert {row.file.name for row in report.rows if row.severity == "error"} == set()

    usable = {path.name for path in usable_images(report)}
    assert usable == {"good_a.png", "good_b.jpg", "z_copy_of_a.png", "no_caption.png", "empty_caption.bmp"}
    assert report.image_count == 8 and report.samples == 5
    assert report.sizes[messy / "good_b.jpg"] == (96, 96) and messy / "cut.jpg" not in report.sizes

    table = report.table()
    assert table.splitlines()[0] == ("dataset health: warnings — 8 images in 1 dataset: 5 usable, 3 skipped, "
                                     "5 samples with repeats")
    assert "subject/cut.jpg" in table and "; skipped" in table
    markdown = report.markdown()
    assert markdown.startswith("**Dataset health: warnings**")
    assert "| severity | file or setting | problem |" in markdown
    assert "subject/cut.jpg" in markdown and "subject/z\\_copy\\_of\\_a.png" in markdown
    assert {row.kind for row in report.rows} == {"unreadable", "too small", "caption", "duplicate", "ignored"}


def test_a_clean_folder_is_ok(tmp_path: Path) -> None:
    for index in range(3):
        _image(tmp_path / f"img_{index}.png", colour=(index * 40, 0, 0))
    report = check_datasets([DatasetEntry(path=str(tmp_path))], batch_size=2, gradient_accumulation=1)
    assert report.verdict == "ok" and report.rows == []
    assert report.table() == "dataset health: ok — 3 images in 1 dataset: 3 usable, 0 skipped, 3 samples with repeats"
    assert len(usable_images(report)) == 3


def test_captions_only_matter_for_the_textfile_strategy(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", caption=None)
    entry = DatasetEntry(path=str(tmp_path), caption_strategy="instance_prompt", instance_prompt="sks dog")
    assert check_datasets([entry]).verdict == "ok"
    report = check_datasets([DatasetEntry(path=str(tmp_path), trigger="sks")])
    assert "trigger word 'sks' alone" in report.rows[0].problem


@pytest.mark.parametrize(("setup", "batch", "accumulation", "verdict", "needle"), [
    ("missing", 1, 1, "will not train", "does not exist"),
    ("empty", 1, 1, "will not train", "no images"),
    ("all_bad", 1, 1, "will not train", "no usable image"),
    ("two", 3, 1, "will not train", "cannot fill one batch of 3"),
    ("two", 1, 4, "warnings", "fewer than one optimiser step"),
    ("two", 2, 1, "ok", ""),
])
def test_datasets_that_cannot_train(tmp_path: Path, setup: str, batch: int, accumulation: int, verdict: str,
                                    needle: str) -> None:
    folder = tmp_path / "data"
    if setup != "missing":
        folder.mkdir()
    if setup == "all_bad":
        _truncated_jpeg(folder / "cut.jpg")
    if setup == "two":
        _image(folder / "a.png", colour=_distinct(1))
        _image(folder / "b.png", colour=_distinct(2))
    report = check_datasets([DatasetEntry(path=str(folder))], batch_size=batch, gradient_accumulation=accumulation)
    assert report.verdict == verdict
    assert needle in report.table()


def test_repeats_holdout_and_settings_come_from_a_spec(tmp_path: Path) -> None:
    subject, regularisation = tmp_path / "subject", tmp_path / "reg"
    subject.mkdir()
    regularisation.mkdir()
    for index in range(3):
        _image(subject / f"s{index}.png", colour=_distinct(index))
    _image(regularisation / "r.png", colour=_distinct(99))
    spec = JobSpec.model_validate({
        "model": {"flavour": "klein-base-4b"},
        "data": {"eval_holdout": 1, "datasets": [{"path": str(subject), "repeats": 2},
                                                 {"path": str(regularisation), "is_regularisation": True}]},
        "train": {"batch_size": 8, "gradient_accumulation": 1},
    })
    report = check_datasets(spec)
    assert report.samples == 3 * 2 + 1 - 1 * 2
    assert report.verdict == "will not train" and "cannot fill one batch of 8" in report.table()
    # The setting a row is about: the CLI's table names its key, the page's markdown its control as `name` says.
    assert "  error     train.batch_size  5 samples" in report.table()
    assert "| error | Batch size (Training, train.batch\\_size) | 5 samples" in report.markdown(
        name=lambda key: {"train.batch_size": "Batch size (Training, train.batch_size)"}[key])
    assert check_datasets(spec, batch_size=5).verdict == "ok"


def test_an_unreadable_mask_skips_its_image(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    _image(images / "a.png", colour=_distinct(1))
    _image(images / "b.png", colour=_distinct(2))
    Image.new("L", (96, 96), 255).save(masks / "a.png")
    (masks / "b.png").write_bytes(b"broken")
    report = check_datasets([DatasetEntry(path=str(images), masks=str(masks))])
    (row,) = report.rows
    assert row.file.name == "b.png" and "its mask b.png" in row.problem and row.skipped
    assert [p.name for p in usable_images(report)] == ["a.png"]


def test_a_file_that_cannot_be_opened_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path / "a.png")
    locked = _image(tmp_path / "locked.png", colour=_distinct(3))
    read_bytes = Path.read_bytes

    def refuse(self: Path) -> bytes:
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    report = check_datasets([DatasetEntry(path=str(tmp_path))])
    (row,) = _rows(report, "locked.png")
    assert row.skipped and row.problem == "cannot read this file (Permission denied)"
    assert [p.name for p in usable_images(report)] == ["a.png"]


def test_long_reports_show_a_few_rows_of_each_kind(tmp_path: Path) -> None:
    for index in range(14):
        _image(tmp_path / f"img_{index:02}.png", colour=_distinct(index), caption=None)
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n")
    report = check_datasets([DatasetEntry(path=str(tmp_path))])
    lines = report.table(per_kind=3).splitlines()
    assert len(lines) == 1 + 1 + 1 + 3 + 1  # verdict, header, the unreadable file, 3 captions, the rest counted
    assert "and 11 more like these (caption)" in lines[-1]
    assert lines[2].split()[1].endswith("/cut.png") and "not an image file Pillow recognises" in lines[2]
    assert len(report.table(per_kind=None).splitlines()) == 1 + 1 + 1 + 14
