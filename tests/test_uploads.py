"""Datasets uploaded through the page (ui/uploads.py): what is written, and every refusal as one message naming the
file and the rule; a refused upload leaves the dataset folder as it was. Plain files, no gradio."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from trainer.folders import Folders, PathRefused
from ui.upload_limits import UploadLimits
from ui.uploads import KEEP, REPLACE, dataset_folder, list_datasets, safe_name, save_upload


def png_bytes(colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def given(tmp_path: Path) -> Path:
    """Where the browser's uploads land (gradio's cache, for the app)."""
    folder = tmp_path / "uploaded"
    folder.mkdir()
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    (tmp_path / "work").mkdir()
    return Folders.of(tmp_path / "work")


def put(folder: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = folder / name
    path.write_bytes(data)
    return path, name


def zip_of(folder: Path, name: str, entries: dict[str, bytes], links: dict[str, str] | None = None) -> tuple[Path, str]:
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
        for entry, target in (links or {}).items():
            info = zipfile.ZipInfo(entry)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path, name


def test_images_with_captions_land_in_the_dataset_folder_under_safe_names(given, folders):
    folder = dataset_folder(folders, "My Set")
    assert folder == folders.workdir / "datasets" / "My_Set"
    files = [put(given, "Photo 1.PNG", png_bytes()), put(given, "Photo 1.txt", b"a red square\n"),
             put(given, "x.jpg", png_bytes())]  # a PNG named .jpg: its content says otherwise
    result = save_upload(files, folder)
    assert sorted(result.written) == ["Photo_1.png", "Photo_1.txt"]
    assert (folder / "Photo_1.txt").read_text() == "a red square\n"
    assert result.refused == ["x.jpg: not a JPG image (its content says otherwise); refused"]
    assert result.message() == f"2 files written to {folder}; 1 refused"
    assert list_datasets(folders) == ["My_Set"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the staging folder is gone


def test_names_are_made_safe():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("CON.txt") == "_CON.txt"
    assert safe_name("  .hidden.PNG ") == "hidden.png"
    assert safe_name("é ü.webp") == "é_ü.webp"
    assert safe_name("写真.JPG") == "写真.jpg"
    assert safe_name(".webp") == ""
    assert safe_name("...") == ""
    assert len(safe_name("a" * 300 + ".png")) <= 100


def test_a_dataset_name_never_leaves_the_datasets_folder(folders, tmp_path):
    assert dataset_folder(folders, "../../outside") == folders.workdir / "datasets" / "outside"
    with pytest.raises(PathRefused, match="Dataset name"):
        dataset_folder(folders, "../..")
    (folders.workdir / "datasets").mkdir()
    os.symlink(tmp_path, folders.workdir / "datasets" / "linked")  # a link that leads out: the folder check
    with pytest.raises(PathRefused, match="outside the folders this app may use"):
        dataset_folder(folders, "linked")


def test_only_images_and_captions_are_accepted(given, folders):
    folder = dataset_folder(folders, "d")
    result = save_upload([put(given, "run.sh", b"#!/bin/sh\n"), put(given, "notes.txt", b"\xff\xfe\x00bad"),
                          put(given, "a.png", png_bytes())], folder)
    assert result.written == ["a.png"]
    assert result.refused[0].startswith("run.sh: only images and captions are accepted (.jpg, ")
    assert result.refused[1] == "notes.txt: a caption must be UTF-8 text; refused"


def test_a_zip_is_unpacked_and_its_escaping_entries_refused(given, folders):
    folder = dataset_folder(folders, "zipped")
    archive = zip_of(given, "set.zip", {"set/a.png": png_bytes(), "set/a.txt": b"caption",
                                        "../evil.png": png_bytes(), "/abs.png": png_bytes(),
                                        "C:/win.png": png_bytes(), "__MACOSX/set/._a.png": b"junk"},
                     links={"set/link.png": "/etc/passwd"})
    result = save_upload([archive], folder)
    assert sorted(result.written) == ["a.png", "a.txt"]
    assert result.refused == [
        "set.zip: ../evil.png: a path that leads out of its folder (..) is not allowed in a zip; refused",
        "set.zip: /abs.png: an absolute path is not allowed in a zip; refused",
        "set.zip: C:/win.png: an absolute path is not allowed in a zip; refused",
        "set.zip: set/link.png: a link is not allowed in a zip; refused"]
    assert result.notes == ["set.zip: __MACOSX/set/._a.png: system metadata, skipped"]
    assert sorted(p.name for p in folders.workdir.rglob("*") if p.is_file()) == ["a.png", "a.txt"]


def test_a_zip_bomb_stops_at_the_expanded_size_and_writes_nothing(given, folders):
    folder = dataset_folder(folders, "bomb")
    limits = UploadLimits(max_total_mb=1, max_files=10)
    declared = zip_of(given, "big.zip", {"a.txt": b"a" * (2 * 2**20)})  # 2 MB of one letter: a few KB zipped
    result = save_upload([declared], folder, limits)
    assert result.folder is None and result.written == []
    assert result.refused[0] == "2 MB: more than the 1 MB an upload may hold (--upload-max-mb); nothing was written"
    # A zip that lies about its sizes expands no further than it declared.
    liar = given / "liar.zip"
    liar.write_bytes(declared[0].read_bytes().replace((2 * 2**20).to_bytes(4, "little"), (10).to_bytes(4, "little")))
    result = save_upload([(liar, "liar.zip")], folder, limits)
    assert result.written == [] and result.refused == ["liar.zip: a.txt: could not be copied (Bad CRC-32 for file "
                                                       "'a.txt'); refused"]
    assert not folder.exists() or not any(folder.iterdir())


def test_the_file_count_is_limited(given, folders):
    files = [put(given, f"{i}.txt", b"c") for i in range(4)]
    result = save_upload(files, dataset_folder(folders, "n"), UploadLimits(max_total_mb=1, max_files=3))
    assert result.refused == ["4 files: more than the 3 files an upload may hold (--upload-max-files); nothing was "
                              "written"]


def test_an_existing_file_is_kept_unless_the_user_chose_to_replace_it(given, folders):
    folder = dataset_folder(folders, "d")
    save_upload([put(given, "a.txt", b"first")], folder)
    result = save_upload([put(given, "a.txt", b"second")], folder, existing=KEEP)
    assert result.written == [] and (folder / "a.txt").read_text() == "first"
    assert result.refused == [f"a.txt: a.txt is already in {folder}; kept (choose 'replace existing files' to "
                              "overwrite it)"]
    result = save_upload([put(given, "a.txt", b"second")], folder, existing=REPLACE)
    assert result.replaced == ["a.txt"] and (folder / "a.txt").read_text() == "second"


def test_two_files_with_one_safe_name_are_not_both_written(given, folders):
    result = save_upload([put(given, "a b.txt", b"1"), put(given, "a_b.txt", b"2")], dataset_folder(folders, "d"))
    assert result.written == ["a_b.txt"]
    assert result.refused == ["a_b.txt: the same name as a b.txt (as a_b.txt); refused"]


def test_a_dataset_folder_holding_a_link_that_leads_out_is_refused(given, folders, tmp_path):
    folder = dataset_folder(folders, "d")
    folder.mkdir(parents=True)
    os.symlink(tmp_path / "uploaded", folder / "a.png")  # an upload must never write through it
    with pytest.raises(PathRefused, match="dataset folder entry"):
        dataset_folder(folders, "d")
