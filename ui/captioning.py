"""Automatic captioning from the app: the form's values checked into a CaptionRequest, which the captioning runner
(trainer/runners/caption.py) runs in a child process. Imports neither torch nor gradio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.data.captioners import CAPTIONERS, CaptionOptions
from trainer.errors import UserError
from trainer.runners.caption import CaptionRequest

MAX_LENGTH_RANGE = (16, 512)  # tokens per caption the form allows


def make_request(folder: str | Path, kind: str, source: str | None, *, trigger: str = "", prefix: str = "",
                 suffix: str = "", max_length: Any = 200, overwrite: bool = False,  # noqa: ANN401
                 batch_size: Any = 4, workdir: Path | None = None) -> CaptionRequest:  # noqa: ANN401
    """A checked request from the form's values; raises UserError naming what cannot work.

    A relative folder or source folder is taken from `workdir`; a source that is no folder there is a hub id.
    """
    problems = []
    if kind not in CAPTIONERS:
        problems.append(f"unknown captioning model {kind!r}; choose one of {', '.join(CAPTIONERS)}")
    text = str(folder or "").strip()
    folder = _from_workdir(text, workdir)
    if not text:
        problems.append("no image folder given (Image folder, above)")
    elif not folder.is_dir():
        problems.append(f"the image folder {folder} does not exist")
    source = (source or "").strip() or None
    if source is not None and workdir is not None and not Path(source).expanduser().is_absolute():
        local = workdir / source
        if local.is_dir():
            source = str(local)
    length = _whole_number(max_length)
    low, high = MAX_LENGTH_RANGE
    if length is None or not low <= length <= high:
        problems.append(f"max length must be a whole number of tokens from {low} to {high} (got {max_length!r})")
    batch = _whole_number(batch_size)
    if batch is None or batch < 1:
        problems.append(f"batch size must be a whole number of at least 1 (got {batch_size!r})")
    if problems:
        raise UserError("; ".join(problems))
    options = CaptionOptions(trigger=trigger or "", prefix=prefix or "", suffix=suffix or "", max_length=length,
                             overwrite=bool(overwrite), batch_size=batch)
    options.check()
    return CaptionRequest(folder.resolve(), kind, source, options)


def _from_workdir(text: str, workdir: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or workdir is None else workdir / path


def _whole_number(value: Any) -> int | None:  # noqa: ANN401
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None
