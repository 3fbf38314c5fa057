"""What every runner of the app answers to: the request that starts it, the typed commands it takes while it runs,
the state it reports and the two refusals. Torch-free; the UI talks to `trainer.runners.app.AppRunner`, which
implements this interface over the others.

    start(request)   begin a run (a whole training run, or a captioning job); AlreadyRunning while one goes on
    send(command)    TrainSteps, ValidateNow, SaveNow, EndTraining: what the Run tab's buttons ask of a live session
    stop()           stop after the current step (or batch); False when nothing runs
    drain()          the events since the last call (trainer/events.py)
    state            RunnerState: the action in progress, whether a session is live, its step
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from trainer.events import Event
from trainer.spec import JobSpec, parse_spec


class AlreadyRunning(RuntimeError):
    """An action is in progress, or a live session stands where a new one was asked for."""


class NothingToDo(RuntimeError):
    """The command cannot act in the runner's present state; the message says why, in the user's words."""


# ---------------------------------------------------------------------- what starts a run


@dataclass(frozen=True)
class RunRequest:
    """One training run: the validated spec (paths resolved), the demo folder to build first when the job trains
    the embedded demo and it is missing, and whether to continue from the latest state in output.dir."""

    spec: JobSpec
    demo_dir: Path | None = None
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "demo_dir": None if self.demo_dir is None else str(self.demo_dir),
                "resume": self.resume}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRequest:
        demo = data.get("demo_dir")
        return cls(parse_spec(data["spec"]), None if demo is None else Path(demo), bool(data.get("resume")))


# ---------------------------------------------------------------------- commands to a live session


@dataclass(frozen=True)
class TrainSteps:
    """Train `steps` more steps, then pause with the session live; `request` sets a session up first when none
    is live (and is ignored while one is: the session keeps the spec it was set up with)."""

    steps: int
    request: RunRequest | None = None


@dataclass(frozen=True)
class ValidateNow:
    """Render the sample prompts with the current LoRA."""


@dataclass(frozen=True)
class SaveNow:
    """Write an intermediate LoRA (and state) at the current step."""


@dataclass(frozen=True)
class EndTraining:
    """Save what was trained since the last save, finish the run and free the session."""


Command = TrainSteps | ValidateNow | SaveNow | EndTraining
# ValidateNow and SaveNow: "requested" (taken after the current step) or "started" (at once, the session paused).
Reply = Literal["requested", "started"] | None
COMMANDS: dict[str, type[Command]] = {kind.__name__: kind for kind in (TrainSteps, ValidateNow, SaveNow, EndTraining)}


def command_to_dict(command: Command) -> dict[str, Any]:
    """A command as JSON for the trainer process's pipe."""
    data: dict[str, Any] = {"command": type(command).__name__}
    if isinstance(command, TrainSteps):
        data.update(steps=command.steps, request=None if command.request is None else command.request.to_dict())
    return data


def command_from_dict(data: dict[str, Any]) -> Command:
    kind = COMMANDS.get(str(data.get("command")))
    if kind is None:
        raise NothingToDo(f"unknown command {data.get('command')!r}")
    if kind is TrainSteps:
        request = data.get("request")
        return TrainSteps(int(data["steps"]), None if request is None else RunRequest.from_dict(request))
    return kind()


# ---------------------------------------------------------------------- state


@dataclass(frozen=True)
class RunnerState:
    """What the app asks of a runner between calls."""

    action: str | None = None  # the action in progress ('start', 'train_steps', 'caption', …), or None
    live: bool = False  # a session exists, holding its models; paused when no action runs
    step: int | None = None  # the live session's step


RequestT = TypeVar("RequestT", contravariant=True)


@runtime_checkable
class Runner(Protocol[RequestT]):
    """The interface every runner implements (see the module's docstring). RequestT: what starts it (RunRequest for
    training, CaptionRequest for captioning); a runner that takes no command refuses each with NothingToDo."""

    @property
    def state(self) -> RunnerState: ...

    def start(self, request: RequestT) -> None: ...

    def send(self, command: Command) -> Reply: ...

    def stop(self) -> bool: ...

    def drain(self) -> list[Event]: ...

    def join(self, timeout: float | None = None) -> bool: ...


class StateViews:
    """The state as properties, for runners whose `state` is a RunnerState."""

    state: RunnerState

    @property
    def running(self) -> bool:
        """An action is in progress."""
        return self.state.action is not None

    @property
    def action(self) -> str | None:
        return self.state.action

    @property
    def live(self) -> bool:
        return self.state.live

    @property
    def paused(self) -> bool:
        return self.live and not self.running

    @property
    def step(self) -> int | None:
        return self.state.step


# ---------------------------------------------------------------------- what a session checks between steps


class Commands:
    """The requests a running session checks between steps (stop, sample now, save now), set by its runner.

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
