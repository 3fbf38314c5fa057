"""`python -m trainer …` that stops dead at one chosen point, for tests that kill it there with SIGKILL.

    python tests/fault_child.py MARKER POINT train job.toml --set …

(tests/test_faults.py calls `run_until` in a forked copy of the test process instead: the same CLI code, without
paying torch's import again.)

POINT is `progress:N` (after the Progress event of step N is written: between steps) or `write:TEXT` (inside
the atomic write of the first file whose path holds TEXT: its temporary file exists, cut to half its size as a
torn write would leave it, and is never renamed). At the point the child writes MARKER and sleeps until killed.
The hooks wrap the project's code from outside, so nothing test-only lives in the trainer.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _block(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(120)  # the test kills us long before
    os._exit(3)


def _block_after_progress(marker: str, step: int) -> None:
    from trainer import events

    real_call = events.JsonlWriter.__call__

    def call(self: events.JsonlWriter, event: events.Event) -> None:
        real_call(self, event)
        if isinstance(event, events.Progress) and event.step == step:
            _block(marker)

    events.JsonlWriter.__call__ = call


def _block_inside_write(marker: str, text: str) -> None:
    real_replace = os.replace

    def replace(src: str | os.PathLike, dst: str | os.PathLike, *args: object, **kwargs: object) -> None:
        if text in Path(dst).as_posix():
            os.truncate(src, os.path.getsize(src) // 2)
            _block(marker)
        real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def run_until(marker: str, point: str, args: list[str]) -> int:
    """The trainer's CLI on `args`, stopping dead at `point` (after writing `marker`)."""
    kind, _, value = point.partition(":")
    if kind == "progress":
        _block_after_progress(marker, int(value))
    elif kind == "write":
        _block_inside_write(marker, value)
    else:
        raise SystemExit(f"unknown point {point!r}: use progress:N or write:TEXT")
    from trainer.__main__ import main as trainer_main

    return trainer_main(args)


if __name__ == "__main__":
    sys.exit(run_until(sys.argv[1], sys.argv[2], sys.argv[3:]))
