"""Opening a file a job names without waiting on it. A FIFO (or a socket, or a device) where a file belongs would
block a plain open or read forever, so files named by a job are opened without blocking and read only when they
are regular files, and no further than a limit a real file of their kind never reaches."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

NOT_REGULAR = "is not a regular file (a pipe, socket or device)"


class NotRegularFile(OSError):
    """The path names a folder, pipe, socket or device; str() says which, in words."""

    def __init__(self, problem: str, folder: bool) -> None:
        super().__init__(problem)
        self.folder = folder


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading in binary; FileNotFoundError, NotRegularFile, or another OSError."""
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        folder = stat.S_ISDIR(mode)
        raise NotRegularFile("is a folder" if folder else NOT_REGULAR, folder)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)  # a regular file: reads go on as usual
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, limit: int) -> bytes | None:
    """The file's bytes, None when it holds more than `limit`; the errors of open_regular."""
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    return None if len(data) > limit else data


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a file ("does not exist", "is a folder", NOT_REGULAR); None when it can."""
    if path.is_file():
        return None
    if not path.exists():
        return "does not exist"
    return "is a folder" if path.is_dir() else NOT_REGULAR
