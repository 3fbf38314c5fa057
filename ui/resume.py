"""The resume offer: does an output folder hold the saved state of a run that did not finish? Files only.

Reads the state files' names (`state/stepNNNNNN.safetensors`, as trainer.checkpoint writes them) and the run's
events.jsonl; never loads a state, so no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoint import EARLIER_RUNS, saved_states
from trainer.events import EvalLoss, Event, Progress, SampleSaved
from trainer.runners.launch import EventsFollower


@dataclass(frozen=True)
class InterruptedRun:
    output_dir: Path
    step: int
    max_steps: int | None
    last_status: str | None  # the last run_finished's status; None when the run never said it finished

    def text(self) -> str:
        how = f"it {self.last_status}" if self.last_status else "it never finished"
        target = f" to step {self.max_steps}" if self.max_steps else ""
        return (f"An interrupted run was found at step {self.step} in {self.output_dir} ({how}). "
                f"Continue at step {self.step} goes on with it{target} with the job in the form (so does Train N "
                f"steps); Start a new run moves it to {self.output_dir / EARLIER_RUNS}/<date-time> and starts at "
                "step 0.")

    def choice(self) -> str:
        """What a Start over this run asks (the page shows the two buttons of the offer)."""
        return (f"a run stopped at step {self.step} in {self.output_dir}: choose Continue at step {self.step} "
                f"(Resume) to go on with it, or Start a new run to move it to {EARLIER_RUNS}/ and start at step 0")


def latest_state_step(output_dir: str | Path) -> int | None:
    """The step of the newest training state in output_dir, from its file name; None if there is none."""
    try:
        states = saved_states(Path(output_dir))
    except OSError:
        return None
    return states[-1][0] if states else None


def last_run(events_path: Path) -> tuple[str | None, int | None]:
    """(status of the last run's run_finished or None, that run's max_steps or None) from an events.jsonl.

    A run_started after the last run_finished means the newest run never finished.
    """
    status: str | None = None
    max_steps: int | None = None
    try:
        with open(events_path, encoding="utf-8") as handle:
            for line in handle:
                if '"run_' not in line:  # cheap: only run_started and run_finished matter
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a half-written last line
                if event.get("event") == "run_started":
                    status, max_steps = None, event.get("max_steps")
                elif event.get("event") == "run_finished":
                    status = event.get("status")
    except (OSError, UnicodeDecodeError):
        return None, None
    return status, max_steps


def find_interrupted_run(output_dir: str | Path, max_steps: int | None = None) -> InterruptedRun | None:
    """The unfinished run in output_dir, if its saved state can be resumed.

    Unfinished: the last run never reported run_finished, or its status was not "completed", or the newest
    state is short of max_steps (the run's own, from events.jsonl; else the one given).
    """
    folder = Path(output_dir)
    step = latest_state_step(folder)
    if step is None:
        return None
    status, run_max_steps = last_run(folder / "events.jsonl")
    target = run_max_steps or max_steps
    if status == "completed" and (target is None or step >= target):
        return None
    return InterruptedRun(folder, step, target, status)


def read_history(output_dir: str | Path) -> list[Event]:
    """The loss, evaluation loss and sample events of the run in output_dir up to its newest saved state (what a
    resume goes on from), in step order; a step trained twice (a crash after the state) counts once, the last."""
    folder = Path(output_dir)
    step = latest_state_step(folder)
    try:
        events = EventsFollower(folder / "events.jsonl").read() if step is not None else []  # whole lines
    except (OSError, UnicodeDecodeError):
        return []
    losses: dict[int, Event] = {}
    others: list[Event] = []
    for event in events:
        if isinstance(event, Progress) and event.step <= step:
            losses[event.step] = event
        elif isinstance(event, (EvalLoss, SampleSaved)) and event.step <= step:
            others.append(event)
    kept = {(type(e).__name__, e.step, getattr(e, "path", "")): e for e in others}  # repeated steps: the last
    return sorted([*losses.values(), *kept.values()], key=lambda event: event.step)
