"""The app's trainer in a process of its own: `ProcessRunner` answers as `TrainingRunner` does (the interface of
trainer/runners/base.py), while a TrainingRunner does the work in a child Python
(`python -m trainer.runners.process`).

Why a process and not a thread: the page must answer within 200 ms while the demo builds, models load and
training runs, and a thread of the app competes with the web server for the GIL; and a trainer that dies (the
kernel's OOM killer, a crash in a CUDA library, kill -9) must not take the app down with it.

The protocol is JSON lines, no pickle: the app writes calls to the child's stdin, `{"id": n, "call": "start" |
"send" | "stop", "args": {...}}` (a RunRequest or a typed command as JSON, base.py); the child answers on a
private copy of its stdout (fd 1 itself goes to stderr, so a library's print cannot corrupt it) with messages
`{"reply": n, ...}` or `{}`, each carrying the events since the last message and the runner's state after them
(`action`, `live`, `step`). State is read before the events are drained, so a message that says nothing runs
also holds every event of what ran. The child's stderr is copied to the app's
and its tail kept: a child that dies says why in the Run view (its exit code or signal, the last lines it wrote),
the run ends as failed, and the next action starts a fresh child.

Torch-free: the app imports this module; torch is imported by the child's worker thread when it first trains.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from trainer.events import Event, EventQueue, LogMessage, RunFinished, event_from_dict
from trainer.runners.base import (
    AlreadyRunning,
    Command,
    NothingToDo,
    Reply,
    RunnerState,
    RunRequest,
    StateViews,
    TrainSteps,
    command_from_dict,
    command_to_dict,
)
from trainer.runners.child import become_child, copy_stderr, describe_exit, start_child
from trainer.runners.thread import TrainingRunner
from trainer.spec import JobSpec

FORWARD_EVERY_S = 0.05  # how often the child sends new events and state when nothing else is said
CALL_TIMEOUT_S = 60.0  # a call only queues work in the child, so an answer this late means the child is stuck
STDERR_TAIL = 40
REFUSALS: dict[str, type[Exception]] = {"AlreadyRunning": AlreadyRunning, "NothingToDo": NothingToDo}


class TrainerProcessError(NothingToDo):
    """The trainer process could not be started or stopped answering; the message says what to do."""


# ---------------------------------------------------------------------- the app's side


class ProcessRunner(StateViews):
    """TrainingRunner's interface for the app, with the runner living in a child process started on first use.

    Every action is a call to the child that returns as soon as the child has queued the work (or refused it with
    AlreadyRunning / NothingToDo, raised here again); events arrive in the background and wait in `drain()`.
    """

    def __init__(self, command: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self._command = command or [sys.executable, "-m", "trainer.runners.process"]
        self._env = env
        self._lock = threading.Lock()  # one call at a time; guards the child's start
        self._changed = threading.Condition()  # notified whenever the state changes
        self._events = EventQueue()
        self._state = RunnerState()
        self._child: subprocess.Popen | None = None
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._stderr_reader: threading.Thread | None = None
        self.spec: JobSpec | None = None  # the spec of the live (or last) session
        _LIVE.add(self)

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (tests kill it)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def output_dir(self) -> Path | None:
        return Path(self.spec.output.dir) if self.spec else None

    def drain(self) -> list[Event]:
        return self._events.drain()

    def join(self, timeout: float | None = None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._state.action is None, timeout)

    # ------------------------------------------------------------------ actions

    def start(self, request: RunRequest) -> None:
        self._call("start", request=request.to_dict())
        self.spec = request.spec

    def send(self, command: Command) -> Reply:
        live = self.live
        result = self._call("send", command=command_to_dict(command))
        if isinstance(command, TrainSteps) and not live and command.request is not None:
            self.spec = command.request.spec  # a live session keeps the spec it was set up with
        return result

    def stop(self) -> bool:
        if self._child is None:
            return False
        return bool(self._call("stop"))

    def close(self, timeout: float = 10.0) -> None:
        """End the child: its stdin closes, it stops training after the current step and exits; killed if it
        has not within `timeout` seconds."""
        with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stdin.close()
        except OSError:
            pass
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    # ------------------------------------------------------------------ the pipe

    def _call(self, name: str, **args: dict[str, Any]) -> Any:  # noqa: ANN401 - the call's result: Reply or bool
        with self._lock:
            child = self._running_child()
            call_id = self._next_id = self._next_id + 1
            try:
                child.stdin.write((json.dumps({"id": call_id, "call": name, "args": args}) + "\n").encode())
                child.stdin.flush()
            except OSError as exc:
                raise TrainerProcessError(f"the trainer process is not answering ({exc}); try again") from None
            with self._changed:
                answered = self._changed.wait_for(
                    lambda: call_id in self._replies or child.poll() is not None, CALL_TIMEOUT_S)
                reply = self._replies.pop(call_id, None)
        if reply is None:
            why = f"it {describe_exit(child.poll())}" if answered else f"no answer within {CALL_TIMEOUT_S:.0f} s"
            tail = self._last_words()
            last = f"; its last words: {tail[-1]}" if tail else ""
            raise TrainerProcessError(f"the trainer process did not take '{name}' ({why}{last}); try again")
        if "refused" in reply:
            raise REFUSALS.get(reply["refused"], NothingToDo)(reply["message"])
        if "error" in reply:
            raise TrainerProcessError(f"the trainer process failed at '{name}': {reply['error']}")
        return reply.get("result")

    def _running_child(self) -> subprocess.Popen:
        """The child, started when there is none (or the last one ended); the lock is held."""
        if self._child is not None and self._child.poll() is None:
            return self._child
        try:
            child = start_child(self._command, self._env)
        except OSError as exc:
            raise TrainerProcessError(f"cannot start the trainer process {self._command[0]}: {exc}") from None
        self._child = child
        self._stderr_tail.clear()
        self._stderr_reader = threading.Thread(target=copy_stderr, args=(child.stderr, self._stderr_tail),
                                               name="trainer-stderr", daemon=True)
        self._stderr_reader.start()
        threading.Thread(target=self._read_messages, args=(child,), name="trainer-messages", daemon=True).start()
        return child

    def _read_messages(self, child: subprocess.Popen) -> None:
        for line in child.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # cannot happen on the private pipe; never let a bad line stop the reader
            self._receive(message)
        child.wait()
        self._child_ended(child)

    def _receive(self, message: dict[str, Any]) -> None:
        for data in message.get("events", ()):
            self._events(event_from_dict(data))  # before the state: a poll that sees it idle has every event
        with self._changed:
            self._state = RunnerState(**message["state"]) if "state" in message else self._state
            if "reply" in message:
                self._replies[message["reply"]] = message
            self._changed.notify_all()

    def _last_words(self) -> list[str]:
        """The tail of a child's stderr once it has ended (its reader may still be catching up)."""
        reader = self._stderr_reader
        if reader is not None:
            reader.join(timeout=2)
        return list(self._stderr_tail)

    def _child_ended(self, child: subprocess.Popen) -> None:
        """The child exited: a run it had in hand ends as failed, saying how the process ended."""
        if self._child is not child:
            return  # an older child, replaced after it had been reported
        state = self._state
        if state.action is not None or state.live:
            how = describe_exit(child.returncode)
            tail = "\n".join(self._last_words())
            if tail:
                self._events(LogMessage(level="error", message=f"the trainer process's last words:\n{tail}"))
            self._events(RunFinished(
                status="failed", step=state.step or 0,
                message=f"the trainer process {how} at step {state.step or 0}; the app is fine. What was saved in "
                        "the output folder is kept: Start with Resume continues from the latest saved state"))
        with self._changed:
            self._state = RunnerState()
            self._changed.notify_all()


_LIVE: weakref.WeakSet[ProcessRunner] = weakref.WeakSet()


@atexit.register
def _close_children() -> None:
    for runner in list(_LIVE):
        runner.close(timeout=5)


# ---------------------------------------------------------------------- the child's side


class _Server:
    """The child: runs the calls it reads on a TrainingRunner and forwards its events and state."""

    def __init__(self, out: IO[bytes]) -> None:
        self.runner = TrainingRunner()
        self._out = out
        self._send_lock = threading.Lock()
        self._last: RunnerState | None = None

    def send(self, message: dict[str, Any] | None = None) -> None:
        message = dict(message or {})
        with self._send_lock:
            state = self.runner.state  # before draining: see the module's docstring
            events = self.runner.drain()
            if not events and state == self._last and "reply" not in message:
                return
            self._last = state
            message.update(events=[event.to_dict() for event in events], state=state.__dict__)
            self._out.write((json.dumps(message) + "\n").encode())
            self._out.flush()

    def forward(self, stop: threading.Event) -> None:
        while not stop.wait(FORWARD_EVERY_S):
            self.send()

    def answer(self, line: bytes) -> None:
        call = json.loads(line)
        try:
            reply = {"reply": call["id"], "result": self.dispatch(call["call"], call.get("args", {}))}
        except (AlreadyRunning, NothingToDo) as exc:
            reply = {"reply": call["id"], "refused": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - reported to the app, which keeps running
            traceback.print_exc()
            reply = {"reply": call["id"], "error": f"{type(exc).__name__}: {exc}"}
        self.send(reply)

    def dispatch(self, name: str, args: dict[str, Any]) -> Reply | bool:
        runner = self.runner
        calls: dict[str, Callable[[], Reply | bool]] = {
            "start": lambda: runner.start(RunRequest.from_dict(args["request"])),
            "send": lambda: runner.send(command_from_dict(args["command"])),
            "stop": runner.stop,
        }
        if name not in calls:
            raise NothingToDo(f"unknown call {name!r}")
        return calls[name]()

    def wind_down(self, timeout: float = 60.0) -> None:
        """The app went away: stop training after the current step (which saves), then leave."""
        self.runner.stop()
        self.runner.join(timeout)


def serve() -> None:
    """The child's main: calls from stdin, messages to a private copy of stdout, everything else to stderr."""
    server = _Server(become_child())
    stop = threading.Event()
    forwarder = threading.Thread(target=server.forward, args=(stop,), name="forwarder", daemon=True)
    forwarder.start()
    for line in sys.stdin.buffer:
        if line.strip():
            server.answer(line)
    server.wind_down()  # stdin closed: the app has exited or closed us
    stop.set()
    server.send()


if __name__ == "__main__":
    serve()
