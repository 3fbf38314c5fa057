"""Datasets brought through the page: images with optional same-named captions, or zips of them, written into
WORKDIR/datasets/<name>/. Plain python (no gradio, no torch).

Whoever can reach the page can upload, so every rule is checked here, one message per refused file naming it and
the rule: only image and caption types (by extension and by content), names made safe, zip entries that would
leave the folder (`../`, absolute paths, links) refused, a total size and a file count (a zip counts by what it
expands to, measured while it expands, so a zip bomb stops at the limit), and an existing file is replaced only
when the user chose to. Files are first written to a staging folder inside the dataset folder and moved into place
only once the whole upload is within the limits, so a refused upload leaves the folder as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from trainer.data.datasets import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS
from trainer.folders import Folders, PathRefused
from ui.upload_limits import UploadLimits

DATASETS_DIR = "datasets"  # under the workdir
ZIP_EXTENSION = ".zip"
MAX_NAME_CHARS = 100
CHUNK = 1 << 20
CAPTION_MAX_BYTES = 64 * 1024  # a caption is a line or a paragraph; a bigger ".txt" is not one
STAGING_PREFIX = ".upload-"
# What a few operating systems put into zips beside the files: skipped with a note, never written.
ZIP_CLUTTER = ("__MACOSX/", ".DS_Store", "Thumbs.db", "desktop.ini")
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
# The first bytes of each accepted image type (RIFF....WEBP is checked at offset 8 too).
IMAGE_SIGNATURES = {".png": (b"\x89PNG\r\n\x1a\n",), ".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",),
                    ".webp": (b"RIFF",), ".bmp": (b"BM",)}
REPLACE, KEEP = "replace", "keep"


@dataclass
class UploadResult:
    """`folder`: the dataset folder (None when it was refused); `written`: names written; `refused`: one message
    per file that was not (naming it and the rule); `notes`: what was skipped on purpose."""

    folder: Path | None
    written: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.folder is None:
            return "not uploaded: " + (self.refused[0] if self.refused else "nothing given")
        count = len(self.written)
        text = f"{count} file{'' if count == 1 else 's'} written to {self.folder}"
        if self.replaced:
            text += f" ({len(self.replaced)} replaced)"
        if self.refused:
            text += f"; {len(self.refused)} refused"
        return text


@dataclass(frozen=True)
class _Member:
    """One file to write: the name as given, where it came from, its declared size, how to open it."""

    shown: str  # as the user knows it: "photo.png" or "set.zip: a/photo.png"
    name: str  # the base name it was given
    size: int
    open: Callable[[], BinaryIO]
    path: Path | None = None  # a file on this machine (not a zip entry): copied by the system, its size known


# ---------------------------------------------------------------------- names


def safe_name(text: str) -> str:
    """A file or folder name that works on every system: letters, digits, `.`, `_` and `-` (others become `_`), no
    leading dots or dashes, no Windows device names, at most MAX_NAME_CHARS; '' when no letter or digit is left."""
    text = re.sub(r"[/\\\s]+", "_", unicodedata.normalize("NFC", text).strip())
    stem, dot, suffix = text.rpartition(".")
    if not (dot and re.fullmatch(r"[A-Za-z0-9]{1,10}", suffix)):  # an extension, or none
        stem, suffix = text, ""
    stem = re.sub(r"[^\w.\-]+", "_", stem)
    stem = re.sub(r"_+", "_", stem).strip(".-_")
    suffix = suffix.lower()
    if not stem:
        return ""
    if stem.split(".")[0].lower() in WINDOWS_RESERVED:
        stem = f"_{stem}"
    stem = stem[:MAX_NAME_CHARS - len(suffix) - 1]
    return f"{stem}.{suffix}" if suffix else stem


def dataset_folder(folders: Folders, name: str) -> Path:
    """WORKDIR/datasets/<name> for a dataset name (made safe), through the allowed-folders check; raises
    PathRefused with a message naming the field."""
    clean = safe_name((name or "").replace(".", "_"))
    if not clean:
        raise PathRefused(f"Dataset name: {name!r} has no letters or digits; give a name such as my_dataset")
    return folders.check_folder_to_write(Path(DATASETS_DIR) / clean, "dataset folder")


def list_datasets(folders: Folders) -> list[str]:
    """The dataset folders under WORKDIR/datasets, by name."""
    root = folders.workdir / DATASETS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and folders.allows(p))


# ---------------------------------------------------------------------- what is given


def _zip_entry_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry may not be written (it would leave the folder, or is a link), or None."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path is not allowed in a zip"
    if ".." in name.split("/"):
        return "a path that leads out of its folder (..) is not allowed in a zip"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a link is not allowed in a zip"
    return None


def _zip_members(path: Path, shown: str, result: UploadResult, limits: UploadLimits,
                 stack: ExitStack) -> Iterator[_Member]:
    """The zip's files (it stays open in `stack` until they are written); refusals go to `result`."""
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
        entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        result.refused.append(f"{shown}: not a readable zip ({exc}); refused")
        return
    if len(entries) > 2 * limits.max_files:  # checked before anything is looked at: a zip of a million entries
        result.refused.append(f"{shown}: {len(entries)} entries, more than the {limits.max_files} files an upload "
                              "may hold (--upload-max-files); refused")
        return
    for info in entries:
        if info.is_dir():
            continue
        entry = f"{shown}: {info.filename}"
        problem = _zip_entry_problem(info)
        if problem:
            result.refused.append(f"{entry}: {problem}; refused")
            continue
        base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
        if info.filename.startswith(ZIP_CLUTTER[0]) or base in ZIP_CLUTTER[1:] or base.startswith("._"):
            result.notes.append(f"{entry}: system metadata, skipped")
            continue
        yield _Member(entry, base, info.file_size, lambda info=info: archive.open(info))


def _members(files: list[tuple[Path, str]], result: UploadResult, limits: UploadLimits,
             stack: ExitStack) -> Iterator[_Member]:
    """Every file to consider, zips opened; (path on this machine, name as the user gave it)."""
    for path, given in files:
        base = Path(given.replace("\\", "/")).name
        if base.lower().endswith(ZIP_EXTENSION):
            yield from _zip_members(path, base, result, limits, stack)
            continue
        yield _Member(base, base, path.stat().st_size, lambda path=path: open(path, "rb"), path)


def _kind_problem(member: _Member) -> str | None:
    suffix = Path(member.name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in CAPTION_EXTENSIONS:
        return None
    accepted = ", ".join((*IMAGE_EXTENSIONS, *CAPTION_EXTENSIONS, ZIP_EXTENSION))
    return f"{member.shown}: only images and captions are accepted ({accepted}); refused"


def _content_problem(path: Path, shown: str) -> str | None:
    """An image whose bytes are not its type's, or a caption that is not short UTF-8 text."""
    suffix = path.suffix.lower()
    with open(path, "rb") as handle:
        head = handle.read(16)
    if suffix in IMAGE_SIGNATURES:
        ok = any(head.startswith(sig) for sig in IMAGE_SIGNATURES[suffix])
        if suffix == ".webp":
            ok = ok and head[8:12] == b"WEBP"
        return None if ok else f"{shown}: not a {suffix[1:].upper()} image (its content says otherwise); refused"
    if path.stat().st_size > CAPTION_MAX_BYTES:
        return f"{shown}: a caption file over {CAPTION_MAX_BYTES // 1024} KB; refused"
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"{shown}: a caption must be UTF-8 text; refused"
    return None


# ---------------------------------------------------------------------- writing


class _OverLimit(Exception):
    pass


def _copy_counted(member: _Member, target: Path, budget: list[int]) -> None:
    """Copy a member to `target`, taking its bytes from budget[0]; raises _OverLimit once that runs out (a zip
    entry that expands beyond what it declared stops there)."""
    if member.path is not None:  # a plain file: the system's copy (several times faster), then its size counted
        shutil.copyfile(member.path, target)
        budget[0] -= target.stat().st_size
        if budget[0] < 0:
            raise _OverLimit
        return
    with member.open() as source, open(target, "wb") as sink:
        while chunk := source.read(CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _OverLimit
            sink.write(chunk)


def _accepted(files: list[tuple[Path, str]], result: UploadResult, limits: UploadLimits,
              stack: ExitStack) -> list[tuple[_Member, str]]:
    """(member, safe name) of every file of an accepted type, each name once."""
    chosen: list[tuple[_Member, str]] = []
    seen: dict[str, str] = {}
    for member in _members(files, result, limits, stack):
        problem = _kind_problem(member)
        clean = safe_name(member.name)
        if not problem and not Path(clean).stem:
            problem = f"{member.shown}: the name has no letters or digits; refused"
        if not problem and clean.lower() in seen:
            problem = f"{member.shown}: the same name as {seen[clean.lower()]} (as {clean}); refused"
        if problem:
            result.refused.append(problem)
            continue
        seen[clean.lower()] = member.shown
        chosen.append((member, clean))
    return chosen


def _over_limits(chosen: list[tuple[_Member, str]], limits: UploadLimits) -> str | None:
    total = sum(member.size for member, _ in chosen)
    if len(chosen) > limits.max_files:
        return f"{len(chosen)} files: more than the {limits.max_files} files an upload may hold (--upload-max-files)"
    if total > limits.max_total_bytes:
        return (f"{total / 2**20:.0f} MB: more than the {limits.max_total_mb} MB an upload may hold "
                "(--upload-max-mb)")
    return None


def _stage(chosen: list[tuple[_Member, str]], staging: Path, limits: UploadLimits,
           result: UploadResult) -> list[tuple[Path, _Member, str]] | None:
    """Copy every file into `staging`, checking its content; None when the upload expands past the limit."""
    budget = [limits.max_total_bytes]
    staged = []
    for member, clean in chosen:
        target = staging / clean
        try:
            _copy_counted(member, target, budget)
        except _OverLimit:
            result.refused.insert(0, f"{member.shown}: the upload expands to more than {limits.max_total_mb} MB "
                                     "(--upload-max-mb); nothing was written")
            return None
        except (OSError, zipfile.BadZipFile, RuntimeError) as exc:  # RuntimeError: an encrypted entry
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            result.refused.append(f"{member.shown}: could not be copied ({reason}); refused")
            continue
        problem = _content_problem(target, member.shown)
        if problem:
            result.refused.append(problem)
            target.unlink()
            continue
        staged.append((target, member, clean))
    return staged


def save_upload(files: list[tuple[str | Path, str]], folder: Path, limits: UploadLimits | None = None,
                existing: str = KEEP) -> UploadResult:
    """Write uploaded files into `folder` (already through the allowed-folders check, see dataset_folder).
    `files`: (path on this machine, the name the user gave it); a .zip is opened and its entries taken.
    `existing`: KEEP leaves a file already in the folder as it is (and says so), REPLACE overwrites it."""
    result = UploadResult(folder)
    with ExitStack() as stack:
        return _save(files, folder, limits or UploadLimits(), existing, result, stack)


def _save(files: list[tuple[str | Path, str]], folder: Path, limits: UploadLimits, existing: str,
          result: UploadResult, stack: ExitStack) -> UploadResult:
    chosen = _accepted([(Path(path), name) for path, name in files], result, limits, stack)
    over = _over_limits(chosen, limits)
    if over:
        return UploadResult(None, refused=[f"{over}; nothing was written", *result.refused], notes=result.notes)
    if not chosen:
        result.folder = None
        result.refused = result.refused or ["no files given"]
        return result
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except OSError as exc:
        return UploadResult(None, refused=[f"{folder}: cannot be written ({exc.strerror or exc})"], notes=result.notes)
    try:
        staged = _stage(chosen, staging, limits, result)
        if staged is None:
            return UploadResult(None, refused=result.refused, notes=result.notes)
        for source, member, clean in staged:
            target = folder / clean
            if target.is_dir():
                result.refused.append(f"{member.shown}: a folder named {clean} is already in {folder}; refused")
                continue
            if target.exists() or target.is_symlink():
                if existing != REPLACE:
                    result.refused.append(f"{member.shown}: {clean} is already in {folder}; kept (choose "
                                          "'replace existing files' to overwrite it)")
                    continue
                result.replaced.append(clean)
            os.replace(source, target)
            result.written.append(clean)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
