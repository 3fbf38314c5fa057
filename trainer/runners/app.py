"""The face the app talks to: one training at a time, in the trainer process (or a thread of this one, in tests)
or in processes on several GPUs. Torch-free.

Studio asks its runner whether something runs, what happened (`drain`) and how to stop it; answering for both
kinds lets the Run view, Stop, the refusals of a second start and of captioning work for a run on several GPUs
without Studio knowing the difference. The request says where a run goes: a RunRequest to the trainer process, a
LaunchRequest to `accelerate launch`.
"""

from __future__ import annotations

from pathlib import Path

from trainer.events import Event
from trainer.runners.base import (
    AlreadyRunning,
    Command,
    NothingToDo,
    Reply,
    RunnerState,
    RunRequest,
    StateViews,
    TrainSteps,
)
from trainer.runners.launch import MULTI_ONLY, LaunchRequest, LaunchRunner
from trainer.runners.process import ProcessRunner
from trainer.runners.thread import TrainingRunner
from trainer.spec import JobSpec

MULTI_RUNNING = "a run on several GPUs is in progress; stop it or wait for it to finish"


class AppRunner(StateViews):
    """The trainer process's runner (`training`) and the runner of runs on several GPUs (`launch`), one at a time."""

    def __init__(self, training: ProcessRunner | TrainingRunner, launch: LaunchRunner | None = None) -> None:
        self.training = training
        self.launch = launch or LaunchRunner()

    @classmethod
    def of(cls, runner: ProcessRunner | TrainingRunner | AppRunner) -> AppRunner:
        return runner if isinstance(runner, AppRunner) else cls(runner)

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> RunnerState:
        return self.launch.state if self.launch.running else self.training.state

    @property
    def spec(self) -> JobSpec | None:
        """The spec of the live (or last) session in the trainer process."""
        return self.training.spec

    def output_dir(self) -> Path | None:
        return self.launch.output_dir if self.launch.running else self.training.output_dir()

    def drain(self) -> list[Event]:
        return self.training.drain() + self.launch.drain()  # one of them runs at a time; the other says nothing

    def join(self, timeout: float | None = None) -> bool:
        return self.training.join(timeout) and self.launch.join(timeout)

    # ------------------------------------------------------------------ actions

    def start(self, request: RunRequest | LaunchRequest) -> None:
        """A whole run: in the trainer process (RunRequest) or on several GPUs (LaunchRequest)."""
        if self.launch.running:
            raise AlreadyRunning(MULTI_RUNNING)
        if isinstance(request, LaunchRequest):
            state = self.training.state
            if state.action is not None:
                raise AlreadyRunning(f"a training action ({state.action}) is in progress; stop it or wait for it")
            if state.live:
                raise AlreadyRunning(f"a session is paused at step {state.step}; End training before starting a "
                                     "run on several GPUs")
            self.launch.start(request)
        else:
            self.training.start(request)

    def send(self, command: Command) -> Reply:
        if self.launch.running:
            if isinstance(command, TrainSteps):
                raise AlreadyRunning(MULTI_RUNNING)
            raise NothingToDo(MULTI_ONLY)
        return self.training.send(command)

    def stop(self) -> bool:
        return self.launch.stop() if self.launch.running else self.training.stop()
