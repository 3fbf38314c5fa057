"""Jobs as files: read and write a job TOML, and the form remembered across restarts. Pure python (no gradio).

The remembered form is the last *valid* job of the form, written to WORKDIR/.studio/last_form.toml on Start, on
Save and (debounced: a preset changes forty controls at once) whenever the form changes; the page shows it again
when it loads. A file that no longer reads as a job is moved aside with a notice, never an error page: the user
then sees the demo job and knows why.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.files import write_text_atomic
from trainer.spec import JobSpec, SpecError, parse_spec, parse_toml, read_job_text, resolve_paths, spec_to_toml

LAST_FORM = "last_form.toml"
FILLED_SUFFIX = ".filled.json"  # beside it: what the last preset or loaded job filled in (see ui/presets.py)
BROKEN_SUFFIX = ".broken"
DEBOUNCE_SECONDS = 1.0  # after the last change; a preset or a loaded job fires one change per control


@dataclass
class Outcome:
    """A message for the status line and the problems (one per line) for the error box; empty = success."""

    message: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth a warning, but nothing failed
    about_form: bool = False  # the problems are the form's own: fixing the form removes them

    @property
    def ok(self) -> bool:
        return not self.problems


def read_job(path: Path, base_dir: Path, name: str | None = None) -> tuple[JobSpec | None, list[str]]:
    """(spec with relative paths taken from `base_dir`, []) or (None, problems each prefixed with the file's
    name). The CLI takes them from the job file's folder; so does Load job."""
    name = name or path.name
    try:
        data = parse_toml(read_job_text(path), name)  # the CLI's checks: a FIFO, deep nesting, not UTF-8
        return resolve_paths(parse_spec(data, name), base_dir), []
    except SpecError as exc:
        return None, [f"{name}: {problem}" for problem in exc.problems]


def relative_paths(path: Path) -> list[str]:
    """The keys of a job file's paths that are relative (taken from some folder when read); [] when it does not
    read as a job."""
    try:
        spec = parse_spec(parse_toml(read_job_text(path), path.name), path.name)  # no FIFO waited on
        one, other = (resolve_paths(spec, base).to_dict() for base in (Path("/one"), Path("/other")))
    except SpecError:
        return []
    return differing_keys(one, other)


def differing_keys(one: Any, other: Any, prefix: str = "") -> list[str]:  # noqa: ANN401 - nested job dicts
    """The dotted keys where two nested dicts (and lists) differ."""
    if isinstance(one, dict) and isinstance(other, dict):
        return [k for key in one for k in differing_keys(one[key], other.get(key), f"{prefix}{key}.")]
    if isinstance(one, list) and isinstance(other, list) and len(one) == len(other):
        return [k for index, (a, b) in enumerate(zip(one, other, strict=True))
                for k in differing_keys(a, b, f"{prefix.rstrip('.')}[{index}].")]
    return [] if one == other else [prefix.rstrip(".")]


def write_job(spec: JobSpec, path: Path) -> None:
    write_text_atomic(path, spec_to_toml(spec))


def default_job_path(jobs_dir: Path, spec: JobSpec) -> Path:
    return jobs_dir / f"{spec.output.name}.toml"


@dataclass(frozen=True)
class Restored:
    """What the page shows when it loads: the remembered job, or None; `notice` says why not, when it matters."""

    spec: JobSpec | None
    notice: str = ""
    filled: dict[str, Any] | None = None  # the form's last fill, when it was kept


class LastForm:
    """The form's last valid job on disk, written at most once per `delay` seconds of quiet; thread-safe (every
    browser session's change events call `remember`)."""

    def __init__(self, path: Path, delay: float = DEBOUNCE_SECONDS) -> None:
        self.path = Path(path)
        self.delay = delay
        self._lock = threading.Lock()
        self._pending: JobSpec | None = None
        self._filled: dict[str, Any] | None = None
        self._timer: threading.Timer | None = None
        self._written = ""  # the text on disk, so an unchanged form is not written again

    @property
    def filled_path(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".toml") + FILLED_SUFFIX)

    def remember(self, spec: JobSpec, filled: dict[str, Any] | None = None) -> None:
        """Write `spec` once the form has been quiet for `delay` seconds (each call restarts the wait). `filled`:
        the form's last fill, kept beside it so that after a restart a preset still tells the user's own edits
        from what an earlier preset filled in."""
        with self._lock:
            self._pending = spec
            self._filled = filled if filled is not None else self._filled
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay, self.flush)
            self._timer.daemon = True  # a pending write must not keep the app from exiting
            self._timer.start()

    def save(self, spec: JobSpec) -> None:
        """Write `spec` now (Start, Save): what is about to run is what the next page load shows."""
        with self._lock:
            self._pending = spec
        self.flush()

    def flush(self) -> None:
        """Write the pending job, if any, now."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            spec, self._pending = self._pending, None
            filled, self._filled = self._filled, None
            if spec is None:
                return
            text = spec_to_toml(spec)
            try:
                if filled is not None:
                    write_text_atomic(self.filled_path, json.dumps(filled))
                if text == self._written and self.path.is_file():
                    return
                write_text_atomic(self.path, text)
            except (OSError, TypeError, ValueError):
                return  # a read-only workdir: the form is simply not remembered; nothing the user must fix now
            self._written = text

    def _read_filled(self) -> dict[str, Any] | None:
        """The kept fill; None when there is none or it cannot be read (the app's defaults then stand in)."""
        try:
            filled = json.loads(self.filled_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return filled if isinstance(filled, dict) else None

    def restore(self, workdir: Path) -> Restored:
        """The remembered job; a file that cannot be read as one is moved to `last_form.toml.broken` and named in
        the notice (so the next page load starts clean and the file is kept for the user to look at)."""
        if not self.path.is_file():
            return Restored(None)
        spec, problems = read_job(self.path, workdir)
        if spec is not None:
            return Restored(spec, filled=self._read_filled())
        aside = self.path.with_name(self.path.name + BROKEN_SUFFIX)
        try:
            self.path.replace(aside)
            where = f"it was moved to {aside}"
        except OSError:
            where = f"it stays at {self.path}"
        shown = "; ".join(problems[:3]) + ("; …" if len(problems) > 3 else "")
        return Restored(None, f"The form saved when the app last ran could not be restored ({shown}); {where}. "
                              "The demo job is shown instead.")

