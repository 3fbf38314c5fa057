"""TensorBoard and Weights & Biases logging through accelerate's trackers: a listener on the run's events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.events import ClipScore, EvalLoss, Event, Progress, RunFinished

TRACKERS = ("tensorboard", "wandb")


def missing_trackers(names: list[str]) -> list[str]:
    """Problems for trackers that are asked for but not installed (checked before the run starts, no torch)."""
    from importlib.util import find_spec

    available = {"tensorboard": bool(find_spec("tensorboard") or find_spec("tensorboardX")),
                 "wandb": bool(find_spec("wandb"))}
    install = {"tensorboard": "tensorboard (or tensorboardX)", "wandb": "wandb"}
    return [f"output.log_with: '{name}' is not installed; `pip install {install[name]}` in the app's .venv "
            "or remove it" for name in names if not available[name]]


class TrackerLogger:
    """Logs loss, learning rate, speed, memory and evaluation loss per step to each configured tracker."""

    def __init__(self, names: list[str], output_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        from accelerate.state import PartialState
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        problems = missing_trackers(names)
        if problems:
            raise UserError("\n".join(problems))
        PartialState()  # the trackers log on the main process, which they ask accelerate's state about
        self.trackers: list[Any] = []
        for name in names:
            tracker = (TensorBoardTracker(run_name, Path(output_dir) / "logs") if name == "tensorboard"
                       else WandBTracker(run_name, dir=str(output_dir)))
            tracker.start()
            tracker.store_init_configuration(config)
            self.trackers.append(tracker)

    def __call__(self, event: Event) -> None:
        values: dict[str, float] = {}
        if isinstance(event, Progress):
            values = {"loss": event.loss, "learning_rate": event.learning_rate,
                      "steps_per_second": event.steps_per_second, "ram_gib": event.ram_gib,
                      "vram_gib": event.vram_gib}
        elif isinstance(event, EvalLoss):
            values = {"eval_loss": event.loss}
        elif isinstance(event, ClipScore):
            values = {"clip_score": event.score}
        for tracker in self.trackers:
            if values:
                tracker.log(values, step=event.step)
        if isinstance(event, RunFinished):
            self.close()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
