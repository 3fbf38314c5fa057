"""One training run in other processes (`accelerate launch ... -m trainer train JOB.toml`), followed from the app.

The processes report only through output.dir/events.jsonl (rank 0 writes it) and are stopped only through the stop
file output.dir/STOP (rank 0 reads it each step and broadcasts the decision, so every rank stops after the same
step). `LaunchRunner` reads the new lines of events.jsonl each time it is drained and answers as every runner does
(trainer/runners/base.py: `state`, `drain()`, `stop()`; the commands to a live session reach runs in the trainer
process only), so the Run view shows either kind of run the same way.

A run whose processes die without a RunFinished (killed, out of memory, a crash before the session reported
anything) would otherwise look alive forever: once the launcher has exited, the run ends as failed with the tail
of the launcher's output, which carries every rank's stderr.

Torch-free: the app imports this module.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import threading
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer.distributed import request_stop, stop_file
from trainer.events import (
    Event,
    EventQueue,
    LogMessage,
    PhaseChanged,
    Progress,
    RunFinished,
    RunStarted,
    event_from_dict,
)
from trainer.runners.base import AlreadyRunning, Command, NothingToDo, Reply, RunnerState, StateViews

EVENTS_FILE = "events.jsonl"
LAUNCH_LOG = "launch.log"  # the launcher's stdout and stderr (every rank's too), rewritten by each launch
TAIL_LINES = 40  # of the launch log, shown in the Run view's log when the processes fail
TAIL_CHARS = 6000
# Lines of a Python traceback's last line ("RuntimeError: ..."), and the CLI's own "error: ..." lines. The
# launcher's wrappers around a rank's failure name only the launcher, never the cause.
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*|error: .+)$")
LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError")
# torchrun's summary of a failure names the rank that failed first and how it ended, e.g. a signal:
#   Root Cause (first observed failure): ... rank : 1 (local_rank: 1) ... exitcode : -9 (pid: 14259)  (SIGKILL)
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n(]*(?:\(pid: \d+\))?\s*(\(\w+\))?",
                        re.DOTALL)


MULTI_ONLY = ("sample now and save now reach runs in this process only; a run on several GPUs samples every "
              "sample.every_steps and saves every output.save_every_steps")


@dataclass(frozen=True)
class LaunchRequest:
    """A run in other processes: `command` (after `prepare(emit)`, which returns False when the run cannot go on
    and has then emitted a RunFinished) must train the job whose output.dir is `output_dir`, where the processes
    write events.jsonl and read STOP; the launcher's output goes to launch.log there."""

    command: Sequence[str]
    output_dir: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    prepare: Callable[[Callable[[Event], None]], bool] | None = field(default=None, compare=False)
    description: str = ""


class EventsFollower:
    """Reads the events appended to an events.jsonl since `offset`: whole lines only, so a line being written is
    read on the next call. The session appends to the file, so a new run starts reading at the old end."""

    def __init__(self, path: Path, offset: int = 0, inode: int | None = None) -> None:
        self.path = Path(path)
        self.offset = offset
        self.inode = inode  # of the file `offset` counts in; None: whichever file is there
        self._partial = b""

    @classmethod
    def from_end(cls, path: Path) -> EventsFollower:
        """A follower of what is appended from now on."""
        try:
            found = path.stat()
        except FileNotFoundError:
            return cls(path, 0)
        return cls(path, found.st_size, found.st_ino)

    def read(self) -> list[Event]:
        try:
            with open(self.path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                # A new run sets the earlier events.jsonl aside and writes a new one, perhaps longer already.
                replaced = self.inode is not None and inode != self.inode
                if replaced or handle.seek(0, os.SEEK_END) < self.offset:  # another file: read it whole
                    self.offset, self._partial = 0, b""
                self.inode = inode
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # b"" after a complete line
        return [event for event in map(_parse, lines) if event is not None]


def _parse(line: bytes) -> Event | None:
    """An event, or None for a line that is not one (a crash mid-write, another program's line)."""
    try:
        return event_from_dict(json.loads(line.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None


def output_tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last `lines` lines of `text`, at most `chars` characters."""
    tail = "\n".join(text.rstrip().splitlines()[-lines:])
    return tail[-chars:]


def failure_cause(text: str) -> str:
    """One line from a launcher's output saying why the processes failed, or '' when none says.

    A rank killed by a signal (the kernel's out-of-memory killer, a kill) is the cause whatever the other ranks
    said about losing it (torchrun's root cause); otherwise a rank's last exception or `error:` line."""
    found = ROOT_CAUSE.search(text)
    rank, code, signal = found.groups() if found else (None, None, None)
    if signal:
        return f"rank {rank} ended with exit code {code} {signal}"
    for line in reversed(text.splitlines()):
        line = line.strip()
        if ERROR_LINE.match(line) and not any(name in line for name in LAUNCHER_ERRORS):
            return line
    return f"rank {rank} ended with exit code {code}" if found else ""


class LaunchRunner(StateViews):
    """A training run in other processes, one at a time, followed through its events.jsonl.

    `start` returns at once: a thread runs the request's `prepare` (e.g. building the demo the job trains) and then
    its command. `drain()` returns what happened since the last call;
    once the processes have exited it ends with a RunFinished, synthesised as failed when they did not write one.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._queue = EventQueue()  # events of our own: preparing, launching, how the processes ended
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._follower: EventsFollower | None = None
        self._stop = threading.Event()
        self._started_seen = False  # the session has reported RunStarted (it has cleared a stale stop file)
        self._finished_seen = False  # a RunFinished went out of drain()
        self._ended_reported = True  # how the processes ended went out of drain() (nothing to report yet)
        self.output_dir: Path | None = None
        self.log_path: Path | None = None
        self.returncode: int | None = None
        self._step = 0  # the last step the run reported
        _live_runs.add(self)

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> RunnerState:
        """'start' while preparing or the processes have not exited yet (the in-process runner's name for a whole
        run); never a live session between actions."""
        thread = self._thread
        running = thread is not None and thread.is_alive()
        return RunnerState("start" if running else None, False, self._step if running else None)

    @property
    def pid(self) -> int | None:
        """The launcher's process id, once launched."""
        return self._process.pid if self._process is not None else None

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the processes have exited; False if `timeout` passed first."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    # ------------------------------------------------------------------ actions

    def start(self, request: LaunchRequest) -> None:
        """Run the request's command; raises AlreadyRunning while a run is going."""
        with self._lock:
            if self.running:
                raise AlreadyRunning("a run on several GPUs is in progress; stop it or wait for it to finish")
            output = Path(request.output_dir)
            output.mkdir(parents=True, exist_ok=True)
            self.output_dir, self.log_path = output, output / LAUNCH_LOG
            self._follower = EventsFollower.from_end(output / EVENTS_FILE)  # older runs' events stay unread
            self._queue = EventQueue()
            self._process, self.returncode, self._step = None, None, 0
            self._stop.clear()
            self._started_seen = self._finished_seen = self._ended_reported = False
            self._thread = threading.Thread(target=self._work, args=(request,), name="launch-run", daemon=True)
            self._thread.start()

    def send(self, command: Command) -> Reply:
        """The commands to a live session reach runs in the trainer process only."""
        raise NothingToDo(MULTI_ONLY)

    def stop(self) -> bool:
        """Ask every rank to stop after its current step (the run then saves the LoRA and state); False when
        nothing is running."""
        with self._lock:
            if not self.running:
                return False
            self._stop.set()
            if self._process is not None:
                # Before the session has started, it would delete this as a stale stop file: drain() writes it again
                # once the session has reported RunStarted.
                request_stop(self.output_dir)
            return True

    def drain(self) -> list[Event]:
        """The run's events since the last call; after the processes have exited, how they ended."""
        with self._lock:
            running = self.running  # before reading: once exited, every line they wrote is in the file
            events = self._queue.drain()
            if self._follower is not None:
                events += self._follower.read()
            for event in events:
                self._note(event)
            if not running and not self._ended_reported and self._thread is not None:
                self._ended_reported = True  # the thread has ended: everything it emitted was drained above
                events += self._ending()
            return events

    # ------------------------------------------------------------------ inside

    def _note(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._started_seen = True
            if self._stop.is_set() and self.running:
                request_stop(self.output_dir)  # the session cleared the one written while it was starting
        elif isinstance(event, Progress):
            self._step = event.step
        elif isinstance(event, RunFinished):
            self._finished_seen = True
            self._step = max(self._step, event.step)

    def _ending(self) -> list[Event]:
        """After the thread ended: how the processes ended, and a failed RunFinished when they wrote none."""
        code = self.returncode
        if code is None:  # never launched: prepare said why (or stop came first, reported by the thread)
            if self._finished_seen:
                return []
            return [RunFinished(status="failed", step=0, message="the training processes were not started")]
        ending: list[Event] = []
        text = self._log_text()
        if code == 0:
            ending.append(LogMessage(level="info", message="the training processes have ended (exit code 0)"))
        else:
            tail = output_tail(text)
            ending.append(LogMessage(level="error", message=f"the training processes ended with exit code {code}; "
                                                            f"the last lines of {self.log_path}:\n{tail}"))
        if not self._finished_seen:
            cause = failure_cause(text)
            message = (f"the training processes ended (exit code {code}) without finishing the run"
                       + (f": {cause}" if cause else f"; see {self.log_path}"))
            ending.append(RunFinished(status="failed", step=self._step, message=message))
            self._finished_seen = True
        stop_file(self.output_dir).unlink(missing_ok=True)  # never leave a stop for the next run to trip on
        return ending

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def _work(self, request: LaunchRequest) -> None:
        emit, command, prepare = self._queue, list(request.command), request.prepare
        try:
            if prepare is not None and not prepare(emit):
                return
            if self._stop.is_set():
                emit(RunFinished(status="stopped", step=0, message="stopped before the training processes started"))
                return
            emit(PhaseChanged(phase="launching", detail=request.description or "accelerate launch"))
            emit(LogMessage(level="info", message="command: " + " ".join(command)))
            assert self.log_path is not None
            with open(self.log_path, "wb") as log:
                # stdin closed: a rank that asks a question fails instead of waiting for an answer nobody gives
                env = dict(os.environ if request.env is None else request.env)
                process = subprocess.Popen(command, cwd=request.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT)
                with self._lock:
                    self._process = process
                    if self._stop.is_set():  # Stop came while launching
                        request_stop(self.output_dir)
                self.returncode = process.wait()
        except Exception as exc:  # noqa: BLE001 - the app must survive anything; the run ends as failed
            emit(LogMessage(level="error", message=traceback.format_exc()))
            emit(RunFinished(status="failed", step=self._step, message=f"the run could not start: "
                                                                      f"{type(exc).__name__}: {exc}"))


# Runs still going when the app exits are asked to stop: they save their LoRA and state at the next step instead of
# training on with nobody to watch them (or being cut off with nothing saved when the terminal closes).
_live_runs: weakref.WeakSet[LaunchRunner] = weakref.WeakSet()


@atexit.register
def _stop_live_runs() -> None:
    for run in list(_live_runs):
        run.stop()
