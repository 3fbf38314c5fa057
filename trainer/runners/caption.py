"""Captioning a folder for the app: `CaptionRunner` (the runner interface of trainer/runners/base.py) follows one
job at a time from a thread, which calls `caption_in_process`: the arguments and callbacks of
`trainer.data.captioners.caption_dataset`, run in `python -m trainer.runners.caption`.

As with training (trainer/runners/process.py), a process of its own keeps the web server's GIL free while a
captioning model loads and generates, and a captioner that crashes or is killed fails its job, not the app. The
child reads one JSON request from stdin and writes JSON lines to a private copy of its stdout: `status`,
`progress`, then `done` (the summary's description) or `error`; a line `stop` on stdin asks it to stop before the
next batch. Torch-free on the app's side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.data.captioners import CAPTIONERS, CaptionOptions, CaptionSummary
from trainer.errors import UserError
from trainer.events import Event, LogMessage, RunFinished
from trainer.runners.base import AlreadyRunning, Command, NothingToDo, Reply, RunnerState, StateViews
from trainer.runners.child import become_child, copy_stderr, describe_exit, start_child

STOP_POLL_S = 0.2  # how often the app's side looks at should_stop
STDERR_TAIL = 20
LOG_LINES = 500

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


@dataclass(frozen=True)
class CaptionOutcome:
    """What the app shows of a finished job: the summary's `describe()` and whether it was stopped."""

    text: str
    stopped: bool

    def describe(self) -> str:
        return self.text


def caption_in_process(folder: Path, kind: str, source: str | Path | None = None,
                       options: CaptionOptions | None = None, *,
                       progress: Callable[[int, int, str], None] | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       status: Callable[[str], None] | None = None,
                       env: dict[str, str] | None = None) -> CaptionOutcome:
    """caption_dataset in a child process; raises UserError with the child's message, or how it ended."""
    request = {"folder": str(folder), "kind": kind, "source": None if source is None else str(source),
               "options": asdict(options or CaptionOptions())}
    child = start_child([sys.executable, "-m", "trainer.runners.caption"], env)
    tail: deque[str] = deque(maxlen=STDERR_TAIL)
    threading.Thread(target=copy_stderr, args=(child.stderr, tail), daemon=True).start()
    child.stdin.write((json.dumps(request) + "\n").encode())
    child.stdin.flush()
    done = threading.Event()
    threading.Thread(target=_pass_stop, args=(child, should_stop, done), daemon=True).start()
    outcome: dict[str, Any] = {}
    try:
        for line in child.stdout:
            message = json.loads(line)
            if "status" in message and status is not None:
                status(message["status"])
            elif "progress" in message and progress is not None:
                progress(*message["progress"])
            elif "done" in message or "error" in message:
                outcome = message
    finally:
        done.set()
        code = child.wait()
    if "done" in outcome:
        return CaptionOutcome(outcome["done"], bool(outcome.get("stopped")))
    if "error" in outcome:
        raise UserError(outcome["error"])
    last = f"; its last words: {tail[-1]}" if tail else ""
    raise UserError(f"the captioning process {describe_exit(code)}{last}")


def _pass_stop(child: subprocess.Popen, should_stop: Callable[[], bool] | None, done: threading.Event) -> None:
    """Tell the child once when should_stop() turns true."""
    while should_stop is not None and not done.wait(STOP_POLL_S):
        if should_stop():
            try:
                child.stdin.write(b"stop\n")
                child.stdin.flush()
            except OSError:
                pass
            return


class CaptionRunner(StateViews):
    """At most one captioning job, followed by a thread; every method is safe to call from any request thread.

    Besides the runner's interface (trainer/runners/base.py: start, stop, drain, state; it takes no commands),
    `snapshot()` is what the Dataset tab's timer reads: loading the model, captioning image n of total, finished,
    stopped or failed, the current file and a log."""

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
        self._events: deque[Event] = deque(maxlen=LOG_LINES)  # what drain() has not returned yet

    # ------------------------------------------------------------------ control

    @property
    def state(self) -> RunnerState:
        with self._lock:
            return RunnerState("caption" if self._state in ACTIVE else None, False, None)

    def drain(self) -> list[Event]:
        """The log lines since the last call, as events, and a RunFinished once the job has ended."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def send(self, command: Command) -> Reply:
        raise NothingToDo("captioning takes no commands; Stop ends it")

    @property
    def folder(self) -> Path | None:
        """The folder of the current or last job."""
        with self._lock:
            return self._folder

    def start(self, request: CaptionRequest) -> None:
        """Start captioning in a thread; raises AlreadyRunning when a job is already running."""
        with self._lock:
            if self._state in ACTIVE:
                raise AlreadyRunning(f"captioning is already in progress in {self._folder}; stop it or wait for it")
            self._stop.clear()
            self._state, self._done, self._total, self._current = LOADING, 0, 0, ""
            self._folder = request.folder
            self._detail = f"starting {request.kind} on {request.folder}"
            self._log.clear()
            self._add_log(f"captioning {request.folder} with {request.kind} "
                          f"({request.source or CAPTIONERS[request.kind]})")
            self._thread = threading.Thread(target=self._work, args=(request,), name="captioning", daemon=True)
            self._thread.start()

    def stop(self) -> bool:
        """Ask the job to stop before its next batch; the captions written so far stay. False when none runs."""
        with self._lock:
            if self._state not in ACTIVE:
                return False
            self._stop.set()
            if self._state != STOPPING:
                self._state = STOPPING
                self._add_log("stop requested: captioning ends before the next batch")
            return True

    def join(self, timeout: float | None = None) -> bool:
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
        self._events.append(LogMessage(level="info", message=line))
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
            status = {FINISHED: "completed", STOPPED: "stopped"}.get(state, "failed")
            self._events.append(RunFinished(status=status, step=self._done, message=detail))


# ---------------------------------------------------------------------- the child's side


def serve() -> None:
    out = become_child()
    send_lock = threading.Lock()

    def send(**message: Any) -> None:  # noqa: ANN401
        with send_lock:
            out.write((json.dumps(message) + "\n").encode())

    request = json.loads(sys.stdin.buffer.readline())
    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin.buffer:
            if line.strip() == b"stop":
                stop.set()
        stop.set()  # the app went away

    threading.Thread(target=watch_stdin, daemon=True).start()
    from trainer.data.captioners import caption_dataset
    from trainer.quiet import silence_library_noise

    silence_library_noise()
    try:
        summary = caption_dataset(Path(request["folder"]), request["kind"], request["source"],
                                  CaptionOptions(**request["options"]),
                                  progress=lambda done, total, name: send(progress=[done, total, name]),
                                  should_stop=stop.is_set, status=lambda line: send(status=line))
    except UserError as exc:
        send(error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the traceback goes to the terminal, the message to the app
        traceback.print_exc()
        send(error=f"{type(exc).__name__}: {exc}")
    else:
        send(done=summary.describe(), stopped=summary.stopped)
    # Leave without the interpreter's shutdown, which would wait for the stdin watcher's lock and abort (a core
    # dump of a process holding a model takes long); everything has been said.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    serve()
