"""The dataset health report: one row per file and problem, the verdict, and the report as a table (CLI) or
Markdown (UI). Data only: health.py fills it, pairs.py adds the edit pairs' rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

Severity = Literal["error", "warning"]
Verdict = Literal["ok", "warnings", "will not train"]
# What a row is about, for grouping long reports: a folder of 300 uncaptioned images says so in a few lines.
Kind = Literal["dataset", "count", "link", "unreadable", "too small", "mask", "pair", "duplicate", "caption",
               "ignored"]
_KIND_ORDER = get_args(Kind)  # the order reports list them in

@dataclass(frozen=True)
class HealthRow:
    file: Path  # a file, a dataset folder, or a job setting (Path("train.batch_size")) for job-wide rows
    problem: str
    severity: Severity
    kind: Kind
    skipped: bool = False  # the image is left out of training
    key: str = ""  # the job setting the row is about (train.batch_size, data.datasets[0].path); the page names its
    # control instead (HealthReport.markdown's `name`)


@dataclass(frozen=True)
class ImageInfo:
    """An image that decoded: its upright size and content hash."""

    path: Path
    size: tuple[int, int]  # (width, height), EXIF orientation applied
    sha256: str
    dataset: int  # index in the datasets checked


@dataclass
class HealthReport:
    datasets: list[Path]
    rows: list[HealthRow] = field(default_factory=list)
    images: list[ImageInfo] = field(default_factory=list)  # every image that decoded, skipped or not
    skipped: set[Path] = field(default_factory=set)
    image_count: int = 0  # image files found (by extension), readable or not
    samples: int = 0  # usable images × repeats, held-out images not counted
    reference_folders: list[Path] = field(default_factory=list)  # edit pairs' conditioning folders
    reference_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)  # every reference that decoded

    @property
    def verdict(self) -> Verdict:
        if any(row.severity == "error" for row in self.rows):
            return "will not train"
        return "warnings" if self.rows else "ok"

    @property
    def sizes(self) -> dict[Path, tuple[int, int]]:
        """Upright (width, height) of every usable image: what `plan_buckets(sizes=...)` takes."""
        return {info.path: info.size for info in self.images if info.path not in self.skipped}

    def counts(self) -> str:
        plural = "s" if len(self.datasets) != 1 else ""
        return (f"{self.image_count} images in {len(self.datasets)} dataset{plural}: "
                f"{len(usable_images(self))} usable, {len(self.skipped)} skipped, "
                f"{self.samples} samples with repeats")

    def _where(self, row: HealthRow, name: Callable[[str], str] | None) -> str:
        """The row's file as display_path shows it, after the setting it is about ('key: dataset/') if any."""
        shown = display_path(self.datasets + self.reference_folders, row.file)
        if not row.key:
            return shown
        setting = name(row.key) if name is not None else row.key
        return setting if shown == row.key else f"{setting}: {shown}"

    def _lines(self, per_kind: int | None, name: Callable[[str], str] | None = None) -> list[tuple[str, str, str]]:
        """(severity, file, problem): errors first; of each kind at most `per_kind` rows and a count of the rest."""
        groups: dict[tuple[bool, str], list[HealthRow]] = {}
        for row in sorted(self.rows, key=lambda row: (row.severity != "error", _KIND_ORDER.index(row.kind),
                                                      str(row.file))):
            groups.setdefault((row.severity != "error", row.kind), []).append(row)
        out: list[tuple[str, str, str]] = []
        for (_, kind), rows in groups.items():
            shown = rows if per_kind is None else rows[:per_kind]
            out += [(row.severity, self._where(row, name), row.problem + ("; skipped" * row.skipped))
                    for row in shown]
            if len(rows) > len(shown):
                out.append((rows[0].severity, "…", f"and {len(rows) - len(shown)} more like these ({kind})"))
        return out

    def table(self, per_kind: int | None = 10) -> str:
        """Plain text for the CLI: the verdict and counts, then the problems (errors first); at most `per_kind`
        rows of each kind of problem, with a count of the rest (None: all)."""
        lines = [f"dataset health: {self.verdict} — {self.counts()}"]
        cells = self._lines(per_kind)
        if cells:
            cells.insert(0, ("severity", "file or setting", "problem"))
            widths = [max(len(cell[i]) for cell in cells) for i in range(2)]
            lines += [f"  {a.ljust(widths[0])}  {b.ljust(widths[1])}  {c}" for a, b, c in cells]
        return "\n".join(lines)

    def markdown(self, per_kind: int | None = 25, name: Callable[[str], str] | None = None) -> str:
        """Markdown for the UI: the verdict in bold, the counts, a table of the problems. `name`: how the page
        names a job setting (the label of its control; the CLI's table shows the key)."""
        lines = [f"**Dataset health: {self.verdict}** — {_escape(self.counts())}"]
        cells = self._lines(per_kind, name)
        if cells:
            lines += ["", "| severity | file or setting | problem |", "| --- | --- | --- |"]
            lines += [f"| {a} | {_escape(b)} | {_escape(c)} |" for a, b, c in cells]
        return "\n".join(lines)


def display_path(datasets: list[Path], path: Path) -> str:
    """A file as `dataset-folder/name`; a folder as `name/`; a job setting (train.batch_size) as it is."""
    for folder in datasets:
        if path == folder:
            return f"{folder.name}/"
        if path.parent == folder:
            return f"{folder.name}/{path.name}"
    return str(path)


def _escape(text: str) -> str:
    for char in "\\|*_`[]<>":
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def usable_images(report: HealthReport) -> list[Path]:
    """Every image that decoded and is not skipped, in dataset order."""
    return [info.path for info in report.images if info.path not in report.skipped]
