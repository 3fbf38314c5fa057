"""What a training run tells the world: frozen dataclasses, sent to a queue (thread) or events.jsonl (CLI).

No torch here: the UI imports this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **asdict(self)}


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    max_steps: int
    output_dir: str
    family: str
    flavour: str


@dataclass(frozen=True)
class PhaseChanged(Event):
    """Loading, caching, training, sampling, saving: what the run is busy with right now."""

    kind: ClassVar[str] = "phase"
    phase: str
    detail: str = ""


@dataclass(frozen=True)
class DownloadProgress(Event):
    """Bytes of a hub download so far (sent a few times a second while model files download)."""

    kind: ClassVar[str] = "download"
    repo_id: str
    downloaded_bytes: int
    total_bytes: int  # 0 while the sizes are not known yet
    files_done: int = 0
    files_total: int = 0

    def describe(self) -> str:
        """'downloading org/repo: 1.2/16.0 GB (8 %), 3/12 files': what the app's progress line and the CLI show."""
        text = f"downloading {self.repo_id}: {self.downloaded_bytes / 1e9:.1f}"
        if self.total_bytes:
            text += f"/{self.total_bytes / 1e9:.1f} GB ({100 * self.downloaded_bytes / self.total_bytes:.0f} %)"
        else:
            text += " GB"
        return text + (f", {self.files_done}/{self.files_total} files" if self.files_total else "")


@dataclass(frozen=True)
class Progress(Event):
    kind: ClassVar[str] = "progress"
    step: int
    max_steps: int
    loss: float
    learning_rate: float
    steps_per_second: float
    eta_seconds: float
    step_seconds: float = 0.0
    ram_gib: float = 0.0  # resident memory of the trainer process
    vram_gib: float = 0.0  # peak CUDA memory allocated during the step; 0 without a GPU


@dataclass(frozen=True)
class ClipScore(Event):
    """Mean CLIPScore (0-100) of one validation's samples against their prompts (sample.clip_score_model)."""

    kind: ClassVar[str] = "clip_score"
    step: int
    score: float


@dataclass(frozen=True)
class EvalLoss(Event):
    """Loss on held-out images at fixed noise levels and noise: comparable from one evaluation to the next."""

    kind: ClassVar[str] = "eval_loss"
    step: int
    loss: float


@dataclass(frozen=True)
class SampleSaved(Event):
    kind: ClassVar[str] = "sample"
    step: int
    path: str
    prompt: str


@dataclass(frozen=True)
class SamplePreview(Event):
    """A sample still rendering: the image so far after `denoise_step` of `denoise_steps` (sample.preview_every),
    sample `index` of `count` at training step `step`. The file goes once the sample's SampleSaved comes."""

    kind: ClassVar[str] = "sample_preview"
    step: int
    index: int  # 1-based
    count: int
    prompt: str
    path: str
    denoise_step: int
    denoise_steps: int


@dataclass(frozen=True)
class LoraSaved(Event):
    kind: ClassVar[str] = "lora_saved"
    step: int
    path: str


@dataclass(frozen=True)
class LogMessage(Event):
    kind: ClassVar[str] = "log"
    level: Literal["info", "warning", "error"]
    message: str


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    status: Literal["completed", "stopped", "failed"]
    step: int
    lora_path: str = ""
    message: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (RunStarted, PhaseChanged, DownloadProgress, Progress, EvalLoss, ClipScore, SampleSaved, SamplePreview,
                LoraSaved, LogMessage, RunFinished)
}


def event_from_dict(data: dict[str, Any]) -> Event:
    values = dict(data)
    cls = EVENT_TYPES[values.pop("event")]
    return cls(**values)


class EventQueue:
    """Thread-safe sink the app drains with a timer."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def __call__(self, event: Event) -> None:
        self._queue.put(event)

    def drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


class JsonlWriter:
    """Appends one JSON object per event, written through at once, so a crash loses at most the event being
    written. A write that fails (a full disk) is cut back to the last whole line and closes the writer: the file
    never ends in a torn line, and the error goes on to the run (with the file's name)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()
        self._handle = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        if self._handle.tell() and _last_byte(path) != b"\n":
            self._handle.write(b"\n")  # a run killed mid-line: end that line, so the next event is not glued to it

    def __call__(self, event: Event) -> None:
        with self._lock:
            if self._handle.closed:
                return
            data = (json.dumps(event.to_dict()) + "\n").encode("utf-8")
            start = self._handle.tell()
            try:
                view = memoryview(data)
                while view:  # an unbuffered write may take part of the line
                    view = view[self._handle.write(view):]
            except OSError as exc:
                with contextlib.suppress(OSError):  # cutting a file back frees space: it works on a full disk
                    self._handle.truncate(start)
                self._handle.close()
                exc.filename = exc.filename or str(self._path)
                raise

    def close(self) -> None:
        with self._lock:
            self._handle.close()
