"""Reading a dataset never follows a link out of its folder (issue 22, point 2): images, captions, masks and edit
pairs' references that are links to files elsewhere are refused by name — in the page's Check dataset and the
CLI's health check alike — and never read, shown or trained on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from test_ui_state import FakeRunner

from trainer.__main__ import main
from trainer.data.datasets import collect_items, find_mask, list_images
from trainer.data.health import check_datasets
from trainer.spec import DatasetEntry
from ui.studio import Studio

SECRET = "root:x:0:0:the secret line"


@pytest.fixture
def linked(tmp_path: Path) -> dict[str, Path]:
    """A workdir dataset of four images: two captions are links to a secret file, one image and one mask are links
    to images outside, as is one edit pair's reference."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    data, masks, refs = work / "data", work / "masks", work / "refs"
    for folder in (data, masks, refs, outside):
        folder.mkdir(parents=True)
    (outside / "passwd").write_text(SECRET + "\n", encoding="utf-8")
    for index in range(4):
        Image.new("RGB", (64, 64), (index * 60, 90, 30)).save(data / f"img_{index}.png")
        Image.new("L", (64, 64), 255).save(masks / f"img_{index}.png")
        Image.new("RGB", (64, 64), (30, index * 60, 90)).save(refs / f"img_{index}.png")
    (data / "img_0.txt").write_text("a plain caption\n", encoding="utf-8")
    (data / "img_1.txt").symlink_to(outside / "passwd")
    (data / "img_2.caption").symlink_to(outside / "passwd")
    Image.new("RGB", (64, 64), (200, 0, 0)).save(outside / "private.png")
    (data / "img_9.png").symlink_to(outside / "private.png")
    (masks / "img_3.png").unlink()
    (masks / "img_3.png").symlink_to(outside / "private.png")
    (refs / "img_2.png").unlink()
    (refs / "img_2.png").symlink_to(outside / "private.png")
    os.symlink(data / "img_0.png", data / "img_5.png")  # a link that stays inside is an ordinary file
    return {"work": work, "data": data, "masks": masks, "refs": refs, "outside": outside}


def test_readers_refuse_links_out_and_name_them(linked: dict[str, Path]) -> None:
    data, masks, refs = linked["data"], linked["masks"], linked["refs"]
    assert [p.name for p in list_images(data)] == ["img_0.png", "img_1.png", "img_2.png", "img_3.png", "img_5.png"]
    assert find_mask(data / "img_3.png", masks) is None and find_mask(data / "img_0.png", masks) == masks / "img_0.png"
    entry = DatasetEntry(path=str(data), masks=str(masks), conditioning=str(refs))
    report = check_datasets([entry])
    links = {row.file.name: row.problem for row in report.rows if row.kind == "link"}
    assert set(links) == {"img_1.txt", "img_2.caption", "img_9.png", "img_3.png", "img_2.png"}, report.table()
    assert all("outside the" in text and "refused" in text for text in links.values())
    assert str(linked["outside"] / "passwd") in links["img_1.txt"]
    assert SECRET not in report.table() and SECRET not in report.markdown()
    assert all(info.path.name != "img_9.png" for info in report.images)

    from trainer.spec import parse_spec

    spec = parse_spec({"model": {"family": "flux2", "flavour": "demo", "source": "/unused"},
                       "data": {"datasets": [{"path": str(data), "masks": str(masks)}]}})
    items = {item.image_path.name: item for item in collect_items(spec)}
    assert set(items) == {"img_0.png", "img_1.png", "img_2.png", "img_3.png", "img_5.png"}
    assert items["img_0.png"].caption == "a plain caption"
    assert items["img_1.png"].caption == items["img_2.png"].caption == "" and items["img_3.png"].mask_path is None


def test_check_dataset_and_cli_validate_name_the_links_and_never_show_them(linked: dict[str, Path], demo_dir: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    studio = Studio(FakeRunner(), linked["work"])
    check = studio.check_dataset(dict(studio.default_values(), **{"dataset.path": str(linked["data"])}))
    assert SECRET not in check.details + check.line + check.buckets
    for name in ("img_1.txt", "img_2.caption", "img_9.png"):
        assert name.replace("_", "\\_") in check.details, check.details
    assert "outside the dataset folder: refused" in check.details

    code = main(["validate", str(demo_dir / "job.toml"), "--set", f"data.datasets[0].path='{linked['data']}'"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert SECRET not in out + err
    assert all(name in out for name in ("img_1.txt", "img_2.caption", "img_9.png")), out
    assert "outside the dataset folder: refused" in out


def test_a_loop_of_links_is_refused_not_a_crash(tmp_path: Path) -> None:
    from trainer.folders import Folders, PathRefused

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(data / "img_0.png")
    (data / "loop.png").symlink_to(data / "loop2.png")
    (data / "loop2.png").symlink_to(data / "loop.png")
    assert [p.name for p in list_images(data)] == ["img_0.png"]
    rows = [row for row in check_datasets([DatasetEntry(path=str(data))]).rows if row.kind == "link"]
    assert sorted(row.file.name for row in rows) == ["loop.png", "loop2.png"]
    folders = Folders.of(tmp_path)
    with pytest.raises(PathRefused, match="loop of links"):
        folders.check(data / "loop.png", "image")
    assert not folders.allows(data / "loop.png")
    with pytest.raises(PathRefused, match="loop of links"):
        folders.check_folder_to_write(data, "output.dir")
