"""Atomic writes: a file is either its old content or its complete new content, never half of one."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Every temporary file (or staging folder) of an atomic write is `.<target name>.<random>.tmp` beside the target.
TEMP_SUFFIX = ".tmp"


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _umask_mode() -> int:
    """The mode a file the user creates gets (0o666 less their umask): mkstemp's own 0600 would keep a ComfyUI or
    a web server running as another user from reading a LoRA or sample the trainer wrote."""
    mask = os.umask(0o022)  # the only way to read the umask is to set it; it is put back at once
    os.umask(mask)
    return 0o666 & ~mask


# read once, at import (before the trainer starts threads that create files)
FILE_MODE = _umask_mode()


def size_text(count: int) -> str:
    """A byte count for people: '1.23 GiB', '456.7 MiB', '12.3 KiB'."""
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 2**power:
            return f"{count / 2**power:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{count} bytes"


def write_atomic(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, flush it to disk, then rename it over `path`.

    `durable=False` skips the fsync: still never torn for readers, but a power cut may lose the file — right
    for caches, which are recomputed when an entry is missing or unreadable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # after the write: some writers (safetensors' save_file) replace the file with one of their own making
        os.chmod(tmp, FILE_MODE)
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            sync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what atomic writes killed midway left in `folder` (not below it); returns what was removed."""
    if not Path(folder).is_dir():
        return []
    removed = []
    for entry in Path(folder).iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (made if missing), tried for real; None when they can."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def disk_full(exc: BaseException) -> bool:
    """Whether an error is the disk filling up: an OSError ENOSPC, or a library's wrapping of one (safetensors'
    SafetensorError says 'I/O error: No space left on device (os error 28)')."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return f"(os error {errno.ENOSPC})" in str(exc) or "No space left on device" in str(exc)


def free_space(folder: Path) -> int | None:
    """Bytes free on the disk that holds `folder` (its nearest existing parent); None when it cannot be told."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def disk_full_text(folder: Path, needed: int | None = None) -> str:
    """'the disk is full: this save needs about 1.2 GiB and 300.0 MiB is free there; free some space ...'."""
    free = free_space(folder)
    sizes = []
    if needed:
        sizes.append(f"this save needs about {size_text(needed)}")
    if free is not None:
        sizes.append(f"{size_text(free)} is free there")
    said = f": {' and '.join(sizes)}" if sizes else ""
    return f"the disk is full{said}; free some space (or choose an output.dir on another disk)"


def describe_write_error(exc: OSError) -> str:
    """An OSError from a save, in the user's words, with what to do about it."""
    if exc.errno == errno.ENOSPC:
        return "the disk is full; free some space (or choose an output.dir on another disk)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror or 'not writable'}; choose an output.dir you can write to, or fix its permissions"
    return f"{exc.strerror or exc}"
