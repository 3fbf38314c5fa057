"""The runs in the workdir's output folder, read from what each run writes (events.jsonl, job.resolved.toml, its
LoRA files), and moving one to the trash. Plain python: no gradio, no torch.

A run's events are replayed into a RunView (ui/run_state.py), the same reading the Run tab makes of a live run,
so the history's loss curve and samples are the Run tab's. A folder's events are read again only when the file
changed.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from trainer.checkpoint import EARLIER_RUNS, saved_states
from trainer.events import event_from_dict
from trainer.folders import Folders, PathRefused
from ui.run_state import ACTIVE, PAUSED, RunView

EVENTS = "events.jsonl"
RESOLVED_JOB = "job.resolved.toml"
TRASH_DIR = "trash"  # under the workdir: deleted runs go here, never gone
STATUS_WORDS = {"completed": "finished", "stopped": "stopped", "failed": "failed"}
COLUMNS = ["run", "flavour", "steps", "status", "last loss", "date"]


@dataclass
class Run:
    """One run folder as the history lists it."""

    name: str
    folder: Path
    flavour: str = ""
    steps_done: int = 0
    steps_planned: int = 0
    status: str = "failed"  # finished | stopped | failed | running
    last_loss: float | None = None
    date: float = 0.0  # when its events were last written
    detail: str = ""
    view: RunView = field(default_factory=RunView)
    loras: list[Path] = field(default_factory=list)
    resumable: bool = False

    def row(self) -> list[str]:
        loss = f"{self.last_loss:.4f}" if self.last_loss is not None else "—"
        return [self.name, self.flavour, f"{self.steps_done} / {self.steps_planned}", self.status, loss,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(self.date))]

    def samples(self) -> list[tuple[str, str]]:
        """(path, label) of the run's sample images that are inside its folder, newest first; the events name them
        where the run wrote them, so an earlier run set aside finds them in its new folder."""
        found = []
        for written, label in self.view.gallery():
            path = Path(written)
            if self.view.output_dir and path.is_relative_to(self.view.output_dir):
                path = self.folder / path.relative_to(self.view.output_dir)
            if path.resolve().is_relative_to(self.folder) and path.is_file():
                found.append((str(path), label))
        return found


def _flavour(folder: Path, view: RunView) -> str:
    try:
        model = tomllib.loads((folder / RESOLVED_JOB).read_text(encoding="utf-8")).get("model", {})
        return f"{model.get('family', '')}/{model.get('flavour', '')}".strip("/")
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        started = next((line for line in view.log_lines if "run started: " in line), "")
        return started.split("run started: ", 1)[-1].split(",", 1)[0] if started else ""


@dataclass
class EventsTail:
    """A run's events.jsonl read so far: the file (inode), how far (bytes, whole lines only), and the view they
    make. A live run's file grows; only the new lines are read each time."""

    inode: int = 0
    offset: int = 0
    view: RunView = field(default_factory=RunView)


def follow(events: Path, tail: EventsTail | None = None) -> EventsTail:
    """`tail` brought up to date with the file's new whole lines; a new tail when the file was replaced or cut
    (a new run moved the earlier one's events aside)."""
    try:
        info = events.stat()
    except OSError:
        return EventsTail()
    if tail is None or tail.inode != info.st_ino or info.st_size < tail.offset:
        tail = EventsTail(info.st_ino)
        tail.view.begin(0)
    if info.st_size > tail.offset:
        with open(events, "rb") as handle:
            handle.seek(tail.offset)
            data = handle.read(info.st_size - tail.offset)
        whole = data[:data.rfind(b"\n") + 1]  # a line being written is read next time
        tail.offset += len(whole)
        parsed = []
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                parsed.append(event_from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line a crash cut short
        tail.view.apply(parsed)
    return tail


def read_run(folder: Path, live: bool = False, name: str | None = None, view: RunView | None = None) -> Run:
    """A run folder; `live`: this app's runner is working in it now; `view`: its events (default: read now). An
    earlier run set aside by a later one in the same folder (name/earlier_runs/<date-time>) is never resumable:
    its job's output.dir is the later run's."""
    events = folder / EVENTS
    view = view if view is not None else follow(events).view
    try:
        date = events.stat().st_mtime
    except OSError:
        date = folder.stat().st_mtime
    detail = view.finished_message
    if live:
        status = "running"
    elif view.status in ACTIVE or view.status == PAUSED:
        status, detail = "failed", "it ended without a result (the app or the machine stopped)"
    else:
        status = STATUS_WORDS.get(view.status, "failed")
    # only files that are inside the folder (a link could lead anywhere): the page offers them for download
    loras = sorted((p for p in folder.glob("*.safetensors") if p.resolve().is_relative_to(folder) and p.is_file()),
                   key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    finished = status == "finished" and view.step >= view.max_steps
    earlier = folder.parent.name == EARLIER_RUNS
    return Run(name=name or folder.name, folder=folder, flavour=_flavour(folder, view), steps_done=view.step,
               steps_planned=view.max_steps, status=status, last_loss=view.loss, date=date, detail=detail,
               view=view, loras=loras,
               resumable=not live and not earlier and not finished and bool(saved_states(folder)))


def _is_run(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (
        (folder / EVENTS).is_file() or (folder / RESOLVED_JOB).is_file())


def _run_folders(root: Path) -> list[tuple[str, Path]]:
    """(name as listed, resolved folder) of the runs under root: name, or name/earlier_runs/<date-time>."""
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.is_symlink() or not folder.is_dir():  # a link could lead anywhere: not listed
            continue
        if _is_run(folder):
            found.append((folder.name, folder.resolve()))
        earlier = folder / EARLIER_RUNS
        if earlier.is_dir() and not earlier.is_symlink():
            found += [(f"{folder.name}/{EARLIER_RUNS}/{old.name}", old.resolve())
                      for old in sorted(earlier.iterdir()) if _is_run(old)]
    return found


class History:
    """The runs under `root` (the workdir's output folder), cached per folder by its events file's size and time."""

    def __init__(self, folders: Folders, root: Path) -> None:
        self.folders, self.root = folders, Path(root)
        self._cache: dict[Path, tuple[tuple[int, float, bool], Run]] = {}
        self._tails: dict[Path, EventsTail] = {}
        self._lock = threading.Lock()

    def runs(self, live_dir: Path | None = None) -> list[Run]:
        """Every run folder (one with events or a resolved job) and the earlier runs set aside in it, the live one
        first, then the newest first."""
        found = []
        with self._lock:
            for name, folder in _run_folders(self.root):
                live = live_dir is not None and folder == Path(live_dir).resolve()
                found.append(self._read(folder, live, name))
        return sorted(found, key=lambda run: (run.status != "running", -run.date))

    def _read(self, folder: Path, live: bool, name: str) -> Run:
        try:
            info = (folder / EVENTS).stat()
            key = (info.st_size, info.st_mtime, live)
        except OSError:
            key = (0, 0.0, live)
        cached = self._cache.get(folder)
        if cached and cached[0] == key:
            return cached[1]
        tail = self._tails[folder] = follow(folder / EVENTS, self._tails.get(folder))
        run = read_run(folder, live, name, tail.view)
        self._cache[folder] = (key, run)
        return run

    def find(self, name: str, live_dir: Path | None = None) -> Run:
        """The run of that name; raises PathRefused for a name that is not one of the listed runs."""
        for run in self.runs(live_dir):
            if run.name == name:
                return run
        raise PathRefused(f"Run: {name!r} is not a run in {self.root}; choose one from the list")

    def trash(self, name: str, live_dir: Path | None = None) -> Path:
        """Move a run folder to WORKDIR/trash/<name>-<date-time>; refused for the running one. Returns where."""
        run = self.find(name, live_dir)
        if run.status == "running":
            raise PathRefused(f"Run: {name} is running; stop it before deleting it")
        source = self.folders.check(run.folder, "run folder")
        trash = self.folders.check_folder_to_write(self.folders.workdir / TRASH_DIR, "trash folder")
        trash.mkdir(parents=True, exist_ok=True)
        stem = f"{name.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
        target, suffix = trash / stem, 1
        while target.exists():
            suffix += 1
            target = trash / f"{stem}-{suffix}"
        shutil.move(str(source), str(target))
        with self._lock:
            self._cache.pop(source, None)
            self._tails.pop(source, None)
        return target
