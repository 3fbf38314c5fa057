"""Captioning a folder in a child process, for the app: `caption_in_process` takes the arguments and callbacks of
`trainer.data.captioners.caption_dataset` and runs it in `python -m trainer.caption_process`.

As with training (trainer/process_runner.py), a process of its own keeps the web server's GIL free while a
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
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.data.captioners import CaptionOptions
from trainer.errors import UserError
from trainer.process_runner import become_child, copy_stderr, describe_exit, start_child

STOP_POLL_S = 0.2  # how often the app's side looks at should_stop
STDERR_TAIL = 20


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
    child = start_child([sys.executable, "-m", "trainer.caption_process"], env)
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
