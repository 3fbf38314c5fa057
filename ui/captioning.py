"""Automatic captioning from the app: one job at a time, followed by a background thread, watched by polling.

`CaptionJob` is the server-side state the Dataset tab's timer reads: what is happening (loading the model,
captioning image n of total, finished, stopped, failed), the current file and a log. The thread runs
`trainer.data.captioners.caption_dataset` in a child process (trainer/caption_process.py), so this module
imports neither torch nor gradio, and a captioner that loads, generates or crashes leaves the page alone.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data.captioners import CAPTIONERS, CaptionOptions, CaptionSummary
from trainer.errors import UserError

LOG_LINES = 500
MAX_LENGTH_RANGE = (16, 512)  # tokens per caption the form allows

# States of a job; the first three mean a thread is working.
LOADING, CAPTIONING, STOPPING = "loading", "captioning", "stopping"
IDLE, FINISHED, STOPPED, FAILED = "idle", "finished", "stopped", "failed"
ACTIVE = frozenset({LOADING, CAPTIONING, STOPPING})

CaptionFunction = Callable[..., CaptionSummary]


@dataclass(frozen=True)
class CaptionRequest:
    """One captioning job: the folder, the model and the options (checked before the thread starts)."""

    folder: Path
    kind: str
    source: str | None  # hub id or local folder; None: the kind's default hub id
    options: CaptionOptions


@dataclass(frozen=True)
class CaptionSnapshot:
    """A consistent copy of the job's state for one poll."""

    state: str
    done: int
    total: int
    current: str
    line: str
    log: str
    version: int  # changes whenever anything above does

    @property
    def running(self) -> bool:
        return self.state in ACTIVE


def make_request(folder: str | Path, kind: str, source: str | None, *, trigger: str = "", prefix: str = "",
                 suffix: str = "", max_length: Any = 200, overwrite: bool = False,  # noqa: ANN401
                 batch_size: Any = 4, workdir: Path | None = None) -> CaptionRequest:  # noqa: ANN401
    """A checked request from the form's values; raises UserError naming what cannot work.

    A relative folder or source folder is taken from `workdir`; a source that is no folder there is a hub id.
    """
    problems = []
    if kind not in CAPTIONERS:
        problems.append(f"unknown captioning model {kind!r}; choose one of {', '.join(CAPTIONERS)}")
    text = str(folder or "").strip()
    folder = _from_workdir(text, workdir)
    if not text:
        problems.append("no image folder given (Image folder, above)")
    elif not folder.is_dir():
        problems.append(f"the image folder {folder} does not exist")
    source = (source or "").strip() or None
    if source is not None and workdir is not None and not Path(source).expanduser().is_absolute():
        local = workdir / source
        if local.is_dir():
            source = str(local)
    length = _whole_number(max_length)
    low, high = MAX_LENGTH_RANGE
    if length is None or not low <= length <= high:
        problems.append(f"max length must be a whole number of tokens from {low} to {high} (got {max_length!r})")
    batch = _whole_number(batch_size)
    if batch is None or batch < 1:
        problems.append(f"batch size must be a whole number of at least 1 (got {batch_size!r})")
    if problems:
        raise UserError("; ".join(problems))
    options = CaptionOptions(trigger=trigger or "", prefix=prefix or "", suffix=suffix or "", max_length=length,
                             overwrite=bool(overwrite), batch_size=batch)
    options.check()
    return CaptionRequest(folder.resolve(), kind, source, options)


def _from_workdir(text: str, workdir: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or workdir is None else workdir / path


def _whole_number(value: Any) -> int | None:  # noqa: ANN401
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


class CaptionJob:
    """At most one captioning thread; every method is safe to call from any request thread."""

    def __init__(self, caption: CaptionFunction | None = None) -> None:
        self._caption = caption  # None: caption_dataset in a child process (tests pass their own)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = IDLE
        self._done = self._total = 0
        self._current = ""
        self._detail = ""  # the last status line while loading; the summary or the error when over
        self._folder: Path | None = None
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._version = 0

    # ------------------------------------------------------------------ control

    @property
    def running(self) -> bool:
        with self._lock:
            return self._state in ACTIVE

    @property
    def folder(self) -> Path | None:
        """The folder of the current or last job."""
        with self._lock:
            return self._folder

    def start(self, request: CaptionRequest) -> None:
        """Start captioning in a thread; raises UserError when a job is already running."""
        with self._lock:
            if self._state in ACTIVE:
                raise UserError(f"captioning is already in progress in {self._folder}; stop it or wait for it")
            self._stop.clear()
            self._state, self._done, self._total, self._current = LOADING, 0, 0, ""
            self._folder = request.folder
            self._detail = f"starting {request.kind} on {request.folder}"
            self._log.clear()
            self._add_log(f"captioning {request.folder} with {request.kind} "
                          f"({request.source or CAPTIONERS[request.kind]})")
            self._thread = threading.Thread(target=self._work, args=(request,), name="captioning", daemon=True)
            self._thread.start()

    def stop(self) -> str:
        """Ask the job to stop before its next batch; the captions written so far stay."""
        with self._lock:
            if self._state not in ACTIVE:
                return "no captioning in progress"
            self._stop.set()
            if self._state != STOPPING:
                self._state = STOPPING
                self._add_log("stop requested: captioning ends before the next batch")
            return "stopping: captioning ends before the next batch (after loading, if the model is still loading)"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when no job is running (for tests and shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    # ------------------------------------------------------------------ what the poll shows

    def snapshot(self) -> CaptionSnapshot:
        with self._lock:
            return CaptionSnapshot(self._state, self._done, self._total, self._current, self._line(),
                                   "\n".join(self._log), self._version)

    def _line(self) -> str:
        counted = f"{self._done}/{self._total}" if self._total else ""
        if self._state == IDLE:
            return "idle"
        if self._state == LOADING:
            return f"loading: {self._detail}"
        if self._state == CAPTIONING:
            return f"captioning {counted}: {self._current}" if self._current else f"captioning {self._detail}"
        if self._state == STOPPING:
            return f"stopping after the current batch{f' ({counted})' if counted else ''}"
        return f"{self._state}: {self._detail}"

    # ------------------------------------------------------------------ the thread

    def _add_log(self, line: str) -> None:  # the lock is held
        self._log.append(f"{time.strftime('%H:%M:%S')} {line}")
        self._version += 1

    def _status(self, line: str) -> None:
        with self._lock:
            if self._state == LOADING and line.startswith("captioning"):
                self._state = CAPTIONING
            self._detail = line
            self._add_log(line)

    def _progress(self, done: int, total: int, name: str) -> None:
        with self._lock:
            if self._state == LOADING:
                self._state = CAPTIONING
            self._done, self._total, self._current = done, total, name
            self._version += 1

    def _work(self, request: CaptionRequest) -> None:
        caption = self._caption
        if caption is None:  # a process of its own: the page keeps answering, a crash fails only the job
            from trainer.caption_process import caption_in_process

            caption = caption_in_process
        try:
            summary = caption(request.folder, request.kind, request.source, request.options,
                              progress=self._progress, should_stop=self._stop.is_set, status=self._status)
        except UserError as exc:
            self._finish(FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - the app keeps running; the log has the traceback
            with self._lock:
                for line in traceback.format_exc().rstrip().splitlines():
                    self._log.append(line)
            self._finish(FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self._finish(STOPPED if summary.stopped else FINISHED, summary.describe())

    def _finish(self, state: str, detail: str) -> None:
        with self._lock:
            self._state, self._detail, self._current = state, detail, ""
            self._add_log(f"{state}: {detail}")
