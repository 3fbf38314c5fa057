"""What the app's child processes share (the trainer process, process.py; the captioning process, caption.py):
how they are started with their pipes, how a child sets itself up, and how a process ended, in words.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import IO

from trainer.quiet import library_warning

ROOT = Path(__file__).resolve().parents[2]
# Lower than the app's priority, so the web server is served first on a machine whose cores training keeps busy.
# Training on a GPU barely notices: its CPU thread only waits on the GPU.
NICENESS = 5


def start_child(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child of the app, with pipes for stdin, stdout (its messages) and stderr, able to import this project."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def copy_stderr(stream: IO[bytes], tail: deque[str]) -> None:
    """Copy a child's stderr to ours (the terminal window shows what it says) and keep its last lines in `tail`,
    libraries' warnings left out (with the indented source line Python prints under one): the last words are the
    child's own."""
    skipping = False
    for raw in stream:
        line = raw.decode("utf-8", "replace")
        skipping = library_warning(line) or (skipping and line[:1].isspace())
        if line.strip() and not skipping:
            tail.append(line.rstrip("\n"))
        try:
            sys.stderr.write(line)
        except (OSError, ValueError):
            pass


def describe_exit(code: int | None) -> str:
    """How a process ended, in words: 'was killed (SIGKILL: out of memory?)', 'exited with code 3'."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ": the system may have run out of memory" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def lower_priority() -> None:
    """Let the app's web server go first when both want the CPU."""
    try:
        if hasattr(os, "nice"):
            os.nice(NICENESS)
        else:  # Windows
            import psutil

            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
    except Exception:  # noqa: BLE001, S110 - a priority we cannot change is no reason not to train
        pass


def become_child() -> IO[bytes]:
    """Set up a child process of the app; returns the private channel for its messages (a copy of stdout).

    fd 1 then goes to stderr, so a library's print cannot corrupt the messages; Ctrl+C in the terminal is the
    app's to handle (it closes our stdin); and the web server goes first when both want the CPU."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    messages = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    lower_priority()
    return messages
