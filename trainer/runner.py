"""Runs one training session at a time in a background thread and relays its events.

The app talks to this module only; torch is imported inside the worker thread so the UI starts fast.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from trainer.events import Event, EventQueue, LogMessage, RunFinished
from trainer.spec import JobSpec


class Commands:
    """Requests from the UI, checked by the session between steps.

    Stop stays set until `clear_stop()`; sample-now and save-now are one-shot and consumed by `take_*`.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._sample = threading.Event()
        self._save = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def clear_stop(self) -> None:
        self._stop.clear()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_sample(self) -> None:
        self._sample.set()

    def request_save(self) -> None:
        self._save.set()

    def take_sample_request(self) -> bool:
        requested = self._sample.is_set()
        self._sample.clear()
        return requested

    def take_save_request(self) -> bool:
        requested = self._save.is_set()
        self._save.clear()
        return requested


class AlreadyRunning(RuntimeError):
    pass


def run_session(spec: JobSpec, emit: Callable[[Event], None], commands: Commands,
                demo_dir: Path | None = None) -> None:
    """Set up, train, save and end one session; every failure ends as a RunFinished event, never an exception.

    With `demo_dir`, the demo models and dataset are built there first if they are missing.
    """
    from trainer.quiet import silence_library_noise

    silence_library_noise()
    from trainer.session import Session

    session = Session(spec, emit=emit, commands=commands)
    try:
        if demo_dir is not None:
            from trainer.demo import ensure_demo

            ensure_demo(demo_dir, emit)
    except Exception as exc:  # noqa: BLE001 - the app must survive anything the trainer does
        emit(LogMessage(level="error", message=traceback.format_exc()))
        emit(RunFinished(status="failed", step=0, message=f"building the demo failed: {exc}"))
        return
    try:
        session.run()
    except Exception:  # noqa: BLE001, S110 - Session.run has already reported it as RunFinished
        pass
    finally:
        session.end()


class TrainingRunner:
    """One training thread at a time; the app polls `drain()` for what happened."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._commands = Commands()
        self._events = EventQueue()
        self._lock = threading.Lock()
        self.spec: JobSpec | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, spec: JobSpec, demo_dir: Path | None = None) -> None:
        """Start `spec` (validated, paths resolved); raises AlreadyRunning if a run is in progress.

        `demo_dir`: build the embedded demo there first when it is missing (the app's default job uses it).
        """
        with self._lock:
            if self.running:
                raise AlreadyRunning("a training run is already in progress; stop it or wait for it to finish")
            self.spec = spec
            self._commands = Commands()
            self._thread = threading.Thread(
                target=run_session, args=(spec, self._events, self._commands, demo_dir), name="trainer", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Ask the run to finish after the current step; it saves the LoRA before it ends."""
        self._commands.request_stop()

    def drain(self) -> list[Event]:
        return self._events.drain()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def output_dir(self) -> Path | None:
        return Path(self.spec.output.dir) if self.spec else None
