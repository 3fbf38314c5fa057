"""Automatic captioning from the app: the form's values checked into a CaptionRequest, which the captioning runner
(trainer/runners/caption.py) runs in a child process. Imports neither torch nor gradio.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.data.captioners import CAPTIONERS, CaptionOptions
from trainer.errors import UserError
from trainer.runners.caption import CaptionRequest
from ui.words import CAPTION_LABELS, IMAGE_FOLDER, field_problem, whole_number_problems

MAX_LENGTH_RANGE = (16, 512)  # tokens per caption the form allows


def make_request(folder: str | Path, kind: str, source: str | None, *, trigger: str = "", prefix: str = "",
                 suffix: str = "", max_length: Any = 200, overwrite: bool = False,  # noqa: ANN401
                 batch_size: Any = 4, workdir: Path | None = None,  # noqa: ANN401
                 labels: Mapping[str, str] | None = None) -> CaptionRequest:
    """A checked request from the form's values; raises UserError naming, in the page's words, each control whose
    value cannot work (`labels`: the form's key → label; the captioning controls' own are words.CAPTION_LABELS).

    A relative folder or source folder is taken from `workdir`; a source that is no folder there is a hub id.
    """
    labels = {**(labels or {}), **CAPTION_LABELS}
    problems = []
    if kind not in CAPTIONERS:
        problems.append(field_problem("caption_model", f"unknown captioning model; choose one of "
                                                       f"{', '.join(CAPTIONERS)}", labels, kind))
    text = str(folder or "").strip()
    folder = _from_workdir(text, workdir)
    if not text:
        problems.append(field_problem(IMAGE_FOLDER, "empty; type the folder that holds the images to caption "
                                                    "(or upload them above)", labels))
    elif not folder.is_dir():
        problems.append(field_problem(IMAGE_FOLDER, f"the folder {folder} does not exist; type the folder that holds "
                                                    "the images to caption", labels, text))
    source = (source or "").strip() or None
    if source is not None and workdir is not None and not Path(source).expanduser().is_absolute():
        local = workdir / source
        if local.is_dir():
            source = str(local)
    problems += max_length_problems(max_length) + batch_size_problems(batch_size)
    if problems:
        raise UserError("; ".join(problems))
    options = CaptionOptions(trigger=trigger or "", prefix=prefix or "", suffix=suffix or "",
                             max_length=int(float(max_length)), overwrite=bool(overwrite),
                             batch_size=int(float(batch_size)))
    options.check()  # the rest (max_chars, extension) are the defaults: they pass
    return CaptionRequest(folder.resolve(), kind, source, options)


def _from_workdir(text: str, workdir: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or workdir is None else workdir / path


def max_length_problems(value: Any) -> list[str]:  # noqa: ANN401
    """The captions' Max length (tokens), in page words: tokens per caption, MAX_LENGTH_RANGE."""
    low, high = MAX_LENGTH_RANGE
    return whole_number_problems("caption_max_length", value, CAPTION_LABELS, low, high, " (tokens per caption; 200 "
                                                                                        "suits most captions)")


def batch_size_problems(value: Any) -> list[str]:  # noqa: ANN401
    """The captions' Batch size, in page words (also checked as it is typed)."""
    return whole_number_problems("caption_batch_size", value, CAPTION_LABELS, 1, None, " (images per model call; "
                                                                                      "lower it if memory runs out)")
