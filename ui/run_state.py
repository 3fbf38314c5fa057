"""What the Run tab shows, accumulated from the runner's events on the server (pure python, no gradio).

One RunView is shared by every browser session, so a second browser sees the job that is already running.
Every method takes the view's lock: poll handlers of several sessions may run at once.

Every open page polls once a second, and the app's users share one link: twenty pages must not cost the run
more than one. So the pages are answered from a `Snapshot`, everything the Run tab shows already rendered, made at
most every SNAPSHOT_EVERY_S by one publisher thread (ui/run_publisher.py) and serialised once: a poll only sends
the latest bytes.
"""

from __future__ import annotations

import html
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from trainer.events import (
    ClipScore,
    DownloadProgress,
    EvalLoss,
    Event,
    LogMessage,
    LoraSaved,
    PhaseChanged,
    Progress,
    RunFinished,
    RunStarted,
    SamplePreview,
    SampleSaved,
)
from ui.preview_state import next_preview

LOG_LINES = 200
DOWNLOADING = "downloading"  # the phase trainer/sources/hub.py announces while model files download
LOSS_SMOOTHING = 0.9  # weight of the previous average in the exponential moving average of the loss
# Every poll that sees new steps sends the whole plot to every open page, and gradio walks every value it sends
# (looking for files) once per page: a plot a few hundred pixels wide needs no more points than this.
PLOT_POINTS = 300
SNAPSHOT_EVERY_S = 0.5  # how often a new snapshot is published while the run changes (a page polls each second)
PLOT_EVERY_S = 5.0  # how often a running run's loss plot is redrawn (status and progress: every snapshot)
LOSS_COLUMNS = ["step", "loss", "series"]
CLIP_COLUMNS = ["step", "clip_score"]
# The loss plot's columns as gradio's LinePlot sends them to the browser (its PlotData), so a snapshot's plot is
# sent as it is, never converted per page.
LOSS_DATATYPES = {"step": "quantitative", "loss": "quantitative", "series": "nominal"}
CLIP_DATATYPES = {"step": "quantitative", "clip_score": "quantitative"}

ACTIVE = ("starting", "running", "stopping")
FINISHED = ("completed", "stopped", "ended", "failed")  # ended: End training before max_steps (the run says stopped)
REFUSED = "refused"  # a Start that did not start, while nothing else went on
PAUSED = "paused"  # a live session waits between actions (the runner's PhaseChanged "paused")
# Phases a session passes through between two steps; the next step's progress ends them.
BETWEEN_STEPS = ("sampling", "saving")


@dataclass(frozen=True)
class LossPoint:
    step: int
    loss: float
    smoothed: float


@dataclass(frozen=True)
class EvalPoint:
    step: int
    loss: float


@dataclass(frozen=True)
class Sample:
    step: int
    path: str
    prompt: str

    @property
    def label(self) -> str:
        return f"step {self.step}: {self.prompt}"


@dataclass(frozen=True)
class Snapshot:
    """Everything the Run tab shows at one moment, rendered once for every page that polls."""

    run_id: int
    version: int
    status: str
    status_text: str
    progress_html: str
    losses: int  # how many loss and evaluation points the plot holds: a page re-draws it only when they change
    evals: int
    plot: dict | None  # the LinePlot's value as sent (columns, data, datatypes, mark); None before the first step
    plot_made: float  # time.monotonic() when the plot was drawn (it is kept for PLOT_EVERY_S while running)
    logged: int  # log lines ever written: a page is sent the log only when it grows
    log_text: str
    samples: int
    clips: int  # how many CLIP scores the CLIP plot holds (it is hidden before the first)
    clip_plot: dict | None  # the CLIP score LinePlot's value as sent; None before the first score
    preview: str  # the file of the sample rendering now, as far as it got ('' when none is: ui/previews.py)
    made: float  # time.monotonic() when it was taken


def thinned(points: list[LossPoint], limit: int) -> list[LossPoint]:
    """At most about `limit` of `points`, evenly spread, the last one always kept."""
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    kept = points[::stride]
    return kept if kept[-1] is points[-1] else [*kept, points[-1]]


def _finite(value: float) -> float | None:
    """JSON has no NaN: a diverged step shows as a gap, as the DataFrame the plot took before sent it."""
    return value if math.isfinite(value) else None


def download_text(event: DownloadProgress) -> str:
    """'downloading org/repo: 1.2/16.0 GB (8 %), 3/12 files'."""
    return event.describe()


def format_duration(seconds: float) -> str:
    """H:MM:SS for an ETA; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class RunView:
    """State of the current (or last) run as the UI shows it: status, progress, losses, samples, log."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.run_id = 0  # counts begin() calls
        self.version = 0  # changes whenever anything shown changes
        self.logged = 0  # log lines ever written: the log changed when it did
        self._reset()

    def _reset(self) -> None:
        self.status = "idle"  # idle | starting | running | stopping | paused | completed | stopped | failed
        self.phase = ""
        self.phase_detail = ""
        self.phase_step = 0  # the step at which the phase began: a later step means training went on
        self.step = 0
        self.max_steps = 0
        self.loss: float | None = None
        self.learning_rate: float | None = None
        self.steps_per_second = 0.0
        self.eta_seconds = float("nan")
        self.step_seconds = 0.0
        self.ram_gib = 0.0  # of the trainer process, from the last Progress; 0 = not measured
        self.vram_gib = 0.0  # peak CUDA memory of the last step; 0 without a GPU
        self.output_dir = ""
        self.lora_path = ""
        self.finished_message = ""
        self.losses: list[LossPoint] = []
        self.eval_losses: list[EvalPoint] = []
        self.clip_scores: list[EvalPoint] = []  # sample.clip_score_model: (step, mean CLIPScore)
        self.samples: list[Sample] = []
        self.preview: SamplePreview | None = None  # the sample rendering now, as far as it got (ui/previews.py)
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)
        self.download: DownloadProgress | None = None  # the latest, while the phase is downloading
        self.ending = False  # End training was pressed: the run's "stopped" is shown as "ended"
        self.refused_about_form = False  # the refusal shown was the form's problems

    # ------------------------------------------------------------------ changes

    @property
    def lock(self) -> threading.RLock:
        """Held by the app around starting a run, so no poll drains events in between."""
        return self._lock

    def begin(self, max_steps: int, description: str = "") -> None:
        """A new run was handed to the runner: forget the previous one."""
        with self._lock:
            self._reset()
            self.run_id += 1
            self.version += 1
            self.status = "starting"
            self.max_steps = max_steps
            if description:
                self._log("info", description)

    def resume_action(self, description: str = "") -> None:
        """A paused session was given another action (train, sample, save, end): it is running again."""
        with self._lock:
            self.status = "running"
            self.phase, self.phase_detail = "", ""
            if description:
                self._log("info", description)
            self.version += 1

    def end_requested(self, description: str = "") -> None:
        """End training was pressed on a paused session: it runs again until it ends, and says "ended"."""
        with self._lock:
            self.resume_action(description)
            self.ending = True

    def refuse(self, message: str, about_form: bool = False) -> None:
        """A Start was refused while nothing else went on: the status line says so, not the last run's end.
        `about_form`: fixing the form removes the reason (see clear_refusal)."""
        with self._lock:
            self._reset()
            self.run_id += 1
            self.version += 1
            self.status, self.finished_message = REFUSED, message
            self.refused_about_form = about_form
            self._log("error", message)

    def clear_refusal(self) -> None:
        """The refused form's problems are gone: back to idle."""
        with self._lock:
            if self.status == REFUSED and self.refused_about_form:
                self.status, self.finished_message = "idle", ""
                self.version += 1

    def restore_history(self, events: Iterable[Event]) -> None:
        """A resumed run's losses and samples from before the resume (see ui.resume.read_history), so the plot
        and the gallery go on from where they were; the step shown is where training resumes."""
        with self._lock:
            for event in events:
                if isinstance(event, Progress):
                    previous = self.losses[-1].smoothed if self.losses else event.loss
                    smoothed = LOSS_SMOOTHING * previous + (1 - LOSS_SMOOTHING) * event.loss
                    self.losses.append(LossPoint(event.step, event.loss, smoothed))
                    self.step = event.step
                elif isinstance(event, EvalLoss):
                    self.eval_losses.append(EvalPoint(event.step, event.loss))
                elif isinstance(event, SampleSaved):
                    self.samples.append(Sample(event.step, event.path, event.prompt))
            self.version += 1

    def request_stop(self, message: str = "stop requested: the run ends after the current step and saves the LoRA"
                     ) -> bool:
        """The user pressed Stop; False when nothing is running."""
        with self._lock:
            if self.status not in ACTIVE:
                return False
            self.status = "stopping"
            self._log("info", message)
            self.version += 1
            return True

    def apply(self, events: Iterable[Event]) -> None:
        with self._lock:
            for event in events:
                self._apply(event)
                self.version += 1

    def thread_ended(self) -> None:
        """The runner is no longer running; a run still shown as active ended without saying so."""
        with self._lock:
            if self.status in ACTIVE:
                self.status = "failed"
                self.finished_message = "the training thread ended without a result; see the console for the error"
                self._log("error", self.finished_message)
                self.version += 1

    def _apply(self, event: Event) -> None:
        self.preview = next_preview(self.preview, event)
        if isinstance(event, RunStarted):
            self.max_steps = event.max_steps
            self.output_dir = event.output_dir
            if self.status not in ("stopping",):
                self.status = "running"
            self._log("info", f"run started: {event.family}/{event.flavour}, {event.max_steps} steps, "
                              f"output {event.output_dir}", event.time)
        elif isinstance(event, DownloadProgress):
            self.download = event
        elif isinstance(event, PhaseChanged):
            self.phase, self.phase_detail, self.phase_step = event.phase, event.detail, self.step
            if event.phase != DOWNLOADING:
                self.download = None
            if event.phase == PAUSED:
                self.status = PAUSED
            elif self.status == PAUSED:
                self.status = "running"
            detail = f" ({event.detail})" if event.detail else ""
            self._log("info", f"{event.phase}{detail}", event.time)
        elif isinstance(event, Progress):
            if self.status == "starting":
                self.status = "running"
            if event.step > self.phase_step and self.phase in BETWEEN_STEPS:
                self.phase, self.phase_detail = "training", ""  # no event says so: sampling/saving is over
            self.step, self.max_steps = event.step, event.max_steps
            self.loss, self.learning_rate = event.loss, event.learning_rate
            self.steps_per_second, self.eta_seconds = event.steps_per_second, event.eta_seconds
            self.step_seconds, self.ram_gib, self.vram_gib = event.step_seconds, event.ram_gib, event.vram_gib
            previous = self.losses[-1].smoothed if self.losses else event.loss
            smoothed = LOSS_SMOOTHING * previous + (1 - LOSS_SMOOTHING) * event.loss
            self.losses.append(LossPoint(event.step, event.loss, smoothed))
        elif isinstance(event, EvalLoss):
            self.eval_losses.append(EvalPoint(event.step, event.loss))
            self._log("info", f"evaluation loss at step {event.step}: {event.loss:.4f}", event.time)
        elif isinstance(event, ClipScore):
            self.clip_scores.append(EvalPoint(event.step, event.score))
        elif isinstance(event, SampleSaved):
            self.samples.append(Sample(event.step, event.path, event.prompt))
            self._log("info", f"sample at step {event.step}: {event.path}", event.time)
        elif isinstance(event, LoraSaved):
            self.lora_path = event.path
            self._log("info", f"LoRA saved at step {event.step}: {event.path}", event.time)
        elif isinstance(event, LogMessage):
            self._log(event.level, event.message, event.time)
        elif isinstance(event, RunFinished):
            self.status = "ended" if self.ending and event.status == "stopped" else event.status
            self.step = max(self.step, event.step)
            if event.lora_path:
                self.lora_path = event.lora_path
            self.finished_message = event.message
            self._log("error" if event.status == "failed" else "info",
                      f"run {event.status} at step {event.step}" + (f": {event.message}" if event.message else ""),
                      event.time)

    def _log(self, level: str, message: str, when: float | None = None) -> None:
        self.logged += 1
        stamp = time.strftime("%H:%M:%S", time.localtime(when if when is not None else time.time()))
        prefix = f"{stamp} {level}: " if level != "info" else f"{stamp} "
        for index, line in enumerate(message.rstrip().splitlines() or [""]):
            self.log_lines.append((prefix if index == 0 else "    ") + line)

    # ------------------------------------------------------------------ what the UI shows

    @property
    def active(self) -> bool:
        with self._lock:
            return self.status in ACTIVE

    @property
    def paused(self) -> bool:
        with self._lock:
            return self.status == PAUSED

    def status_text(self) -> str:
        """One plain line: 'idle', 'starting: building demo', 'running: step 12/40', 'paused at step 12 — …',
        'completed: LoRA saved to …'."""
        with self._lock:
            if self.status == "idle":
                return "idle"
            if self.status == REFUSED:
                return self.finished_message
            if self.status == PAUSED:
                if self.max_steps and self.step >= self.max_steps:
                    return f"paused at step {self.step} — max_steps reached, End training to finish"
                return f"paused at step {self.step} — Train N steps to continue, End training to finish"
            if self.status in ("starting", "running", "stopping"):
                if self.step > 0 or (self.status == "running" and self.max_steps):
                    text = f"{self.status}: step {self.step}/{self.max_steps}"
                    if self.phase and self.phase != "training":
                        text += f" ({self.phase})"
                    return text
                return f"{self.status}: {self.phase}" if self.phase else self.status
            if self.status == "failed":
                return f"failed: {self.finished_message or 'see the log'}"
            where = f"LoRA saved to {self.lora_path}" if self.lora_path else "no LoRA saved"
            extra = self.finished_message
            if extra and (extra == where or (self.lora_path and self.lora_path in extra)):
                extra = ""  # the run's own message already says where the LoRA is
            return f"{self.status}: {where}" + (f" ({extra})" if extra else "")

    def progress_fraction(self) -> float:
        with self._lock:
            return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0

    def progress_line(self) -> str:
        """'step 12/40 · 3.10 it/s · ETA 0:00:09 · loss 0.1234 · lr 1.00e-04 · eval loss 0.1301 (step 10) ·
        trainer RAM 1.2 GiB · trainer peak VRAM 3.1 GiB · 0.32 s/step'."""
        with self._lock:
            idle = "no run started" if self.status == REFUSED else "no run yet"
            parts = [f"step {self.step}/{self.max_steps}" if self.max_steps else idle]
            if self.download is not None and self.status in ACTIVE:
                parts.append(download_text(self.download))
            if self.steps_per_second > 0:
                parts.append(f"{self.steps_per_second:.2f} it/s")
            if self.status in ACTIVE and self.step:
                parts.append(f"ETA {format_duration(self.eta_seconds)}")
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4f}")
            if self.learning_rate is not None:
                parts.append(f"lr {self.learning_rate:.2e}")
            if self.eval_losses:
                last = self.eval_losses[-1]
                parts.append(f"eval loss {last.loss:.4f} (step {last.step})")
            if self.clip_scores:
                last = self.clip_scores[-1]
                parts.append(f"CLIP score {last.loss:.1f} (step {last.step})")
            if self.ram_gib > 0 or self.vram_gib > 0:  # the trainer's own; the gauges below show the machine's
                parts.append(f"trainer RAM {self.ram_gib:.1f} GiB"
                             + (f" · trainer peak VRAM {self.vram_gib:.1f} GiB" if self.vram_gib > 0 else ""))
            if self.step_seconds > 0:
                parts.append(f"{self.step_seconds:.2f} s/step")
            return " · ".join(parts)

    def loss_rows(self, max_points: int = PLOT_POINTS) -> list[dict[str, float | int | str]]:
        """Long-format rows for a line plot: the raw loss, its moving average, and the evaluation loss; at most
        `max_points` steps per series (evenly spread, the newest always in)."""
        with self._lock:
            rows: list[dict[str, float | int | str]] = []
            for point in thinned(self.losses, max_points):
                rows.append({"step": point.step, "loss": point.loss, "series": "loss"})
                rows.append({"step": point.step, "loss": point.smoothed, "series": "smoothed"})
            rows += [{"step": point.step, "loss": point.loss, "series": "eval"} for point in self.eval_losses]
            return rows

    def first_and_latest(self) -> list[tuple[Sample, Sample]]:
        """Each prompt's first sample (step 0 in a new run) and its latest, prompts in the order they were sampled."""
        with self._lock:
            pairs: dict[str, tuple[Sample, Sample]] = {}
            for sample in self.samples:
                first = pairs[sample.prompt][0] if sample.prompt in pairs else sample
                pairs[sample.prompt] = (first, sample)
            return list(pairs.values())

    def progress_html(self) -> str:
        """The progress bar (coloured by status) over the progress line."""
        with self._lock:
            percent = round(100 * self.progress_fraction(), 1)
            colour = {"failed": "#dc2626", "stopped": "#d97706", "completed": "#16a34a", "paused": "#2563eb"}.get(
                self.status, "#f97316")
            return (
                '<div style="display:flex;flex-direction:column;gap:6px">'
                '<div style="height:14px;border-radius:7px;background:var(--neutral-200,#e5e7eb);overflow:hidden">'
                f'<div style="height:100%;width:{percent}%;background:{colour};transition:width .4s"></div></div>'
                f"<div>{html.escape(self.progress_line())}</div></div>"
            )

    def snapshot(self, previous: Snapshot | None = None) -> Snapshot:
        """What every page shows now, rendered once; while the run is active, `previous`'s plot is kept until it is
        PLOT_EVERY_S old (every page is sent a new plot whole)."""
        with self._lock:
            now = time.monotonic()
            keep = (previous is not None and previous.run_id == self.run_id and self.status in ACTIVE
                    and now - previous.plot_made < PLOT_EVERY_S)
            if keep:
                plot, losses, evals, plot_made = previous.plot, previous.losses, previous.evals, previous.plot_made
            else:
                plot, losses, evals, plot_made = self._plot(), len(self.losses), len(self.eval_losses), now
            clips = len(self.clip_scores)
            clip_plot = previous.clip_plot if previous is not None and previous.run_id == self.run_id \
                and previous.clips == clips else self._clip_plot()
            return Snapshot(self.run_id, self.version, self.status, self.status_text(), self.progress_html(),
                            losses, evals, plot, plot_made, self.logged, self.log_text(), len(self.samples), clips,
                            clip_plot, self._live_preview(), now)

    def _live_preview(self) -> str:
        return self.preview.path if self.preview is not None and self.status in ACTIVE else ""

    def _plot(self) -> dict | None:
        rows = self.loss_rows()
        if not rows:
            return None
        data = [[row["step"], _finite(row["loss"]), row["series"]] for row in rows]
        return {"columns": list(LOSS_COLUMNS), "data": data, "datatypes": dict(LOSS_DATATYPES), "mark": "line"}

    def _clip_plot(self) -> dict | None:
        if not self.clip_scores:
            return None
        data = [[point.step, _finite(point.loss)] for point in self.clip_scores]
        return {"columns": list(CLIP_COLUMNS), "data": data, "datatypes": dict(CLIP_DATATYPES), "mark": "line"}

    def clip_rows(self) -> list[dict[str, float | int]]:
        """The CLIP score of each validation (sample.clip_score_model), for its line plot."""
        with self._lock:
            return [{"step": point.step, "clip_score": point.loss} for point in self.clip_scores]

    def gallery(self) -> list[tuple[str, str]]:
        """(path, 'step N: prompt'), newest first."""
        with self._lock:
            return [(sample.path, sample.label) for sample in reversed(self.samples)]

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(self.log_lines)
