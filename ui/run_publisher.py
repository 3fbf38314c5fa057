"""The Run tab's state, published once per change for every page that watches it (pure python, no gradio).

The app's users share one link, and every open page asks for the run's state once a second: twenty pages must not
cost the run more than one. So one thread here drains the runner's events into the RunView, renders a Snapshot
(ui/run_state.py) when something shown changed (at most every SNAPSHOT_EVERY_S while steps go on; at once when the
run, its status or the buttons' states change) and serialises it once, into the JSON parts a page fetches from a
plain route (ui/run_route.py): a page's poll only sends bytes made here, or answers 304 when it has them already.

The parts, each with its own ETag so a page fetches a big one only when it changed:
- state: status line, progress, memory gauges, the buttons' states, the keys of the samples and the live preview
  (a page asks gradio for the images only when they change), and the versions of the other parts;
- plot, clip: the loss and CLIP score LinePlots' values as gradio sends them; log: the log's text;
- caption_log: the captioning log (the Dataset tab's captioning line is in the state).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ui.run_state import SNAPSHOT_EVERY_S, RunView, Snapshot

PUBLISH_EVERY_S = 0.25  # how often the thread drains the runner's events and looks for changes
GAUGES_EVERY_S = 2.0  # the memory gauges (psutil, NVML) are read this often, once for every page
PARTS = ("state", "plot", "clip", "log", "caption_log")

if TYPE_CHECKING:
    from trainer.runners.caption import CaptionSnapshot


@dataclass(frozen=True)
class Part:
    """One part of the published state: its JSON as sent, and the ETag that names this version."""

    etag: str
    body: bytes


@dataclass(frozen=True)
class Published:
    snapshot: Snapshot
    actions: dict[str, str]  # why each of the Run tab's buttons cannot act now ('' when it can), Studio.actions
    memory_html: str
    caption: CaptionSnapshot  # the captioning job's line and log (the Dataset tab)
    parts: dict[str, Part]


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _part(key: str, value: object, previous: Published | None, name: str) -> Part:
    """The part named `name` for version `key`: the previous one when its version is the same (no new bytes)."""
    etag = f'"{name}-{key}"'
    if previous is not None and previous.parts[name].etag == etag:
        return previous.parts[name]
    return Part(etag, _json(value))


def serialise(snap: Snapshot, actions: dict[str, str], memory_html: str, caption: CaptionSnapshot, number: int,
              previous: Published | None = None) -> Published:
    """The snapshot as the parts the pages fetch; the plot, CLIP plot and log are serialised again only when their
    version changed. `number` counts publications: the state's ETag."""
    run = snap.run_id
    keys = {"plot": f"{run}.{snap.losses}.{snap.evals}", "clip": f"{run}.{snap.clips}",
            "log": f"{run}.{snap.logged}", "caption_log": str(caption.version)}
    state = {"run": run, "status": snap.status, "status_text": snap.status_text, "progress": snap.progress_html,
             "memory": memory_html, "actions": actions, "samples": f"{run}:{snap.samples}",
             "ended": f"{run}:{snap.status}", "preview": f"{run}:{snap.preview}", "caption": caption.line,
             **{name: f'"{name}-{key}"' for name, key in keys.items()}}
    parts = {
        "state": Part(f'"state-{number}"', _json(state)),
        "plot": _part(keys["plot"], snap.plot, previous, "plot"),
        "clip": _part(keys["clip"], snap.clip_plot, previous, "clip"),
        "log": _part(keys["log"], snap.log_text, previous, "log"),
        "caption_log": _part(keys["caption_log"], caption.log, previous, "caption_log"),
    }
    return Published(snap, dict(actions), memory_html, caption, parts)


class RunPublisher:
    """Publishes the Run tab's state from one thread; `latest()` is all a page's poll does.

    refresh: drains the runner's events into `view` and returns the buttons' states (Studio.refresh).
    gauges: the memory gauges' HTML (read every GAUGES_EVERY_S).
    captioning: the captioning job's state (CaptionRunner.snapshot).
    """

    def __init__(self, view: RunView, refresh: Callable[[], dict[str, str]], gauges: Callable[[], str],
                 captioning: Callable[[], CaptionSnapshot]) -> None:
        self.view = view
        self._refresh = refresh
        self._gauges = gauges
        self._captioning = captioning
        self._lock = threading.Lock()  # one publication at a time (the thread's, or a first one before it runs)
        self._published: Published | None = None
        self._number = 0
        self._memory = ("", -GAUGES_EVERY_S)  # (html, time.monotonic() when read)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.renders = 0  # snapshots made: what a watcher costs shows here (tests)

    def latest(self) -> Published:
        """The published state; the first call (no thread yet, as in tests) publishes one."""
        published = self._published
        return published if published is not None else self.publish()

    def publish(self) -> Published:
        """Drain the runner's events; when what the page shows changed, render and serialise it once."""
        with self._lock:
            actions, caption = self._refresh(), self._captioning()
            now = time.monotonic()
            memory = self._memory
            if now - memory[1] >= GAUGES_EVERY_S:
                memory = self._memory = (self._gauges(), now)
            current, view = self._published, self.view
            with view.lock:
                if current is not None and not self._due(current, actions, memory[0], now) \
                        and caption.version == current.caption.version:
                    return current
                snap = view.snapshot(current.snapshot if current is not None else None)
            self.renders += 1
            self._number += 1
            self._published = serialise(snap, actions, memory[0], caption, self._number, current)
            return self._published

    def _due(self, current: Published, actions: dict[str, str], memory_html: str, now: float) -> bool:
        """Whether to publish anew: at once for another run, status, buttons' states or gauges; for new steps and
        log lines at most every SNAPSHOT_EVERY_S."""
        snap, view = current.snapshot, self.view
        if (snap.run_id, snap.status) != (view.run_id, view.status) or actions != current.actions \
                or memory_html != current.memory_html:
            return True
        return snap.version != view.version and now - snap.made >= SNAPSHOT_EVERY_S

    def start(self) -> None:
        """Publish from a daemon thread every PUBLISH_EVERY_S until stop(); a second start does nothing."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="run-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_EVERY_S):
            try:
                self.publish()
            except Exception as exc:  # noqa: BLE001 - the pages must go on being answered; the console says why
                print(f"run publisher: {type(exc).__name__}: {exc}", flush=True)
