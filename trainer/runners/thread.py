"""Drives one training session at a time from a worker thread and relays its events.

The worker owns one live `Session` and takes actions from a queue, in the order users think in:

    init → train n steps → validate → save → … → end

Between actions the session stays live and paused, holding its models, caches and optimiser. `start` is the
whole run in one action (setup, train to max_steps, save, end), as the CLI does it. One action runs at a time;
stop, sample-now and save-now also reach an action in progress, through the `Commands` the session checks
between steps. Every failure ends as a RunFinished event, never as an exception in the app.

The trainer process (process.py) runs this; torch is imported inside the worker thread.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.demo import prepare_demo
from trainer.errors import UserError
from trainer.events import Event, EventQueue, LogMessage, PhaseChanged, RunFinished
from trainer.runners.base import (
    AlreadyRunning,
    Command,
    Commands,
    EndTraining,
    NothingToDo,
    Reply,
    RunnerState,
    RunRequest,
    SaveNow,
    StateViews,
    TrainSteps,
    ValidateNow,
)
from trainer.spec import JobSpec

# Actions during which the session is between training steps often enough to take stop/sample/save requests.
TRAINING_ACTIONS = ("start", "train_steps")
PAUSED_PHASE = "paused"


def run_session(request: RunRequest, emit: Callable[[Event], None], commands: Commands,
                on_live: Callable[[Any], None] | None = None) -> None:
    """Set up, train, save and end one session; every failure ends as a RunFinished event, never an exception.

    With `request.demo_dir`, the demo models and dataset are built there first if they are missing. `on_live` is
    told the session once it exists and None once it has ended.
    """
    from trainer.quiet import silence_library_noise

    silence_library_noise()
    from trainer.session import Session

    session = Session(request.spec, emit=emit, commands=commands, resume=request.resume)
    if not prepare_demo(request.demo_dir, emit):
        return
    if on_live is not None:
        on_live(session)
    try:
        session.run()
    except Exception:  # noqa: BLE001, S110 - Session.run has already reported it as RunFinished
        pass
    finally:
        session.end()
        if on_live is not None:
            on_live(None)


@dataclass(frozen=True)
class _Action:
    name: str
    work: Callable[[], None]


class TrainingRunner(StateViews):
    """One live session at a time, driven by actions that a worker thread runs one by one (trainer/runners/base.py
    has the interface).

    The app polls `drain()` for what happened. Actions (each returns at once; the work runs in the worker):

    - `start(request)`: the whole run — setup, train to max_steps, save, RunFinished, end.
    - `send(TrainSteps(n, request))`: set a session up if none is live, train n more steps, then pause (live).
    - `send(ValidateNow())`, `send(SaveNow())`: while training, a request taken after the current step; while
      paused, the work itself in the worker.
    - `stop()`: training stops after the current step. A `start` run then saves and ends as it always has; a
      `train_steps` action saves the LoRA (and state) and pauses, so training can continue.
    - `send(EndTraining())`: save what was trained since the last save, RunFinished, free the session.

    An action asked for while another is in progress raises AlreadyRunning (stop, validate_now and save_now
    reach a training action instead); one that cannot act now raises NothingToDo with the reason.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._actions: queue.SimpleQueue[_Action] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._action: str | None = None  # the action in progress
        self._commands = Commands()
        self._events = EventQueue()
        self._session: Any = None  # the live Session; only the worker changes it
        self.spec: JobSpec | None = None  # the spec of the live (or last) session

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> RunnerState:
        session = self._session
        return RunnerState(self._action, session is not None, None if session is None else session.step)

    def output_dir(self) -> Path | None:
        return Path(self.spec.output.dir) if self.spec else None

    def drain(self) -> list[Event]:
        return self._events.drain()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no action is in progress; False if `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._action is None, timeout)

    # ------------------------------------------------------------------ actions

    def start(self, request: RunRequest) -> None:
        """The whole run of `request.spec` (validated, paths resolved): setup, train to max_steps, save, end.

        `request.demo_dir`: build the embedded demo there first when it is missing (the app's default job uses
        it). `request.resume`: continue exactly from the latest training state in output.dir.
        Raises AlreadyRunning while an action is in progress or a session is live (paused).
        """
        with self._lock:
            self._refuse_if_busy()
            self._refuse_if_live()
            self.spec = request.spec
            self._commands = commands = Commands()
            self._submit("start", lambda: run_session(request, self._events, commands, on_live=self._set_session))

    def send(self, command: Command) -> Reply:
        """One of the commands to a live session (trainer/runners/base.py); raises AlreadyRunning or NothingToDo
        with the reason when it cannot act now."""
        if isinstance(command, TrainSteps):
            return self._train_steps(command)
        if isinstance(command, ValidateNow):
            return self._validate_now()
        if isinstance(command, SaveNow):
            return self._save_now()
        if isinstance(command, EndTraining):
            return self._end_training_now()
        raise NothingToDo(f"unknown command {command!r}")

    def _train_steps(self, command: TrainSteps) -> None:
        """Train `steps` more steps, then pause with the session live; sets a session up first if none is live.

        While a session is live, the request is ignored: the session keeps the spec it was set up with (End
        training, then train again, to change settings).
        """
        steps, request = command.steps, command.request
        if steps < 1:
            raise NothingToDo(f"steps: train at least 1 step, not {steps}")
        with self._lock:
            self._refuse_if_busy()
            session = self._session
            if session is not None and session.step >= session.spec.train.max_steps:
                raise NothingToDo(f"max_steps ({session.spec.train.max_steps}) reached at step {session.step}: "
                                  "End training to save the final LoRA")
            if session is None:
                if request is None:
                    raise NothingToDo("no session to continue: start or train a job first")
                self.spec = request.spec
                self._commands = Commands()
                self._submit("train_steps", lambda: self._setup_and_train(request, steps))
            else:
                self._commands.clear_stop()
                self._submit("train_steps", lambda: self._train(steps))

    def _validate_now(self) -> Reply:
        """Render the sample prompts with the current LoRA: after the current step while training ('requested'),
        at once in the worker while paused ('started')."""
        with self._lock:
            spec = self._request_target("sample")
            if not spec.sample.prompts:
                raise NothingToDo("this session has no sample prompts (sample.prompts); End training and start "
                                  "again with some to sample")
            if self.running:
                self._commands.request_sample()
                return "requested"
            self._submit("validate_now", self._guarded(self._validate))
            return "started"

    def _save_now(self) -> Reply:
        """Write an intermediate LoRA (and state) at the current step: after the current step while training
        ('requested'), at once in the worker while paused ('started')."""
        with self._lock:
            self._request_target("save")
            if self.running:
                self._commands.request_save()
                return "requested"
            self._submit("save_now", self._guarded(self._save_intermediate))
            return "started"

    def stop(self) -> bool:
        """Ask training to stop after the current step; False when no training action is in progress.

        A `start` run then saves the LoRA and ends; `train_steps` saves the LoRA and state and pauses.
        """
        with self._lock:
            if self._action not in TRAINING_ACTIONS:
                return False
            self._commands.request_stop()
            return True

    def _end_training_now(self) -> None:
        """Save the final LoRA and state (if anything was trained since the last save), emit RunFinished and
        free the session."""
        with self._lock:
            self._refuse_if_busy()
            if self._session is None:
                raise NothingToDo("no session to end: start or train first")
            self._submit("end_training", self._guarded(self._end_training))

    # ------------------------------------------------------------------ bookkeeping (lock held)

    def _refuse_if_busy(self) -> None:
        if self._action is not None:
            raise AlreadyRunning(f"a training action ({self._action}) is in progress; stop it or wait for it "
                                 "to finish")

    def _refuse_if_live(self) -> None:
        if self._session is not None:
            raise AlreadyRunning(f"a session is paused at step {self._session.step}; End training before "
                                 "starting a new run (or Train N steps to continue it)")

    def _request_target(self, what: str) -> JobSpec:
        """The spec of the session a sample/save request is for; refuses when there is none to ask."""
        if self._action is not None and self._action not in TRAINING_ACTIONS:
            raise AlreadyRunning(f"busy with {self._action}; try again when it is done")
        if self._action is None and self._session is None:
            raise NothingToDo(f"nothing to {what}: start or train first")
        assert self.spec is not None
        return self.spec

    def _submit(self, name: str, work: Callable[[], None]) -> None:
        self._action = name
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="trainer", daemon=True)
            self._worker.start()
        self._actions.put(_Action(name, work))

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        from trainer.quiet import silence_library_noise

        silence_library_noise()
        while True:
            action = self._actions.get()
            try:
                action.work()
            except Exception:  # noqa: BLE001 - last resort: the view marks a run that said nothing as failed
                traceback.print_exc()
            finally:
                with self._idle:
                    self._action = None
                    self._idle.notify_all()

    def _set_session(self, session: Any) -> None:  # noqa: ANN401 - a Session; torch-free module
        self._session = session

    def _emit(self, event: Event) -> None:
        """Through the live session (so events.jsonl has it too), else straight to the app."""
        (self._session.emit if self._session is not None else self._events)(event)

    def _guarded(self, work: Callable[[], None]) -> Callable[[], None]:
        """`work` whose failure is reported as RunFinished(failed) and ends the session."""

        def run() -> None:
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - the app must survive anything the trainer does
                step = self._session.step if self._session is not None else 0
                if isinstance(exc, UserError):
                    message = str(exc)
                else:
                    self._emit(LogMessage(level="error", message=traceback.format_exc()))
                    message = f"{type(exc).__name__}: {exc}"
                self._emit(RunFinished(status="failed", step=step, message=message))
                self._end_session()

        return run

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.end()
            except Exception:  # noqa: BLE001 - freeing memory must not take the app down
                self._events(LogMessage(level="error", message=traceback.format_exc()))

    def _pause(self) -> None:
        self._emit(PhaseChanged(phase=PAUSED_PHASE, detail=f"step {self._session.step}"))

    def _setup_and_train(self, request: RunRequest, steps: int) -> None:
        if not prepare_demo(request.demo_dir, self._events):
            return
        spec = request.spec

        def setup() -> None:
            from trainer.session import Session

            session = Session(spec, emit=self._events, commands=self._commands, resume=request.resume)
            self._set_session(session)
            session.begin()  # as a whole run begins (Session.run)
            self._train(steps)

        self._guarded(setup)()

    def _train(self, steps: int) -> None:
        self._guarded(lambda: self._train_unguarded(steps))()

    def _train_unguarded(self, steps: int) -> None:
        session, commands = self._session, self._commands
        session.train(steps)
        # Requests that came in during the last step, which the loop no longer checked.
        if commands.take_sample_request():
            session.validate()
        saves = commands.take_save_request()
        every = session.spec.output.save_every_steps
        due = every and session.step % every == 0 and session.step < session.spec.train.max_steps
        if commands.stop_requested:
            commands.clear_stop()
            session.save_final()
            self._emit(LogMessage(level="info", message=f"stopped at step {session.step}; Train N steps to "
                                                        "continue, End training to finish"))
        elif saves or due:  # the loop skips the interval save on a chunk's last step
            session.save(intermediate=True, copy_to_comfy=saves)
        self._pause()

    def _validate(self) -> None:
        self._session.validate()
        self._pause()

    def _save_intermediate(self) -> None:
        self._session.save(intermediate=True, copy_to_comfy=True)
        self._pause()

    def _end_training(self) -> None:
        self._session.finish()  # as a whole run finishes (Session.run): final LoRA, final samples, RunFinished
        self._end_session()
