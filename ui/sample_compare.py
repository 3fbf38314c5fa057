"""Each sample prompt's first sample (step 0 of a run) beside its latest, as one small HTML block for the Run tab: the
change a run makes, visible without scrolling through the gallery."""

from __future__ import annotations

import html
from pathlib import Path

from trainer.folders import Folders
from ui.run_state import RunView

COMPARE_PX = 128  # shown size of the step-0 and latest samples side by side


def _allowed_image(path: str, roots: list[str], folders: Folders | None) -> Path | None:
    """The sample file, if the page may show it (the gallery's rule); None otherwise."""
    resolved = Path(path).resolve()
    allowed = any(resolved.is_relative_to(root) for root in roots) or folders is None or folders.allows(resolved)
    return resolved if allowed and resolved.is_file() else None


def _thumbnail_uri(path: Path, size: int = COMPARE_PX) -> str:
    """The image as a PNG data URI at most `size` px wide (a real model's 1024 px sample would weigh megabytes)."""
    import base64
    import io

    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def compare_html(view: RunView, roots: list[str], folders: Folders | None = None) -> str:
    """One row per sample prompt: its first sample (step 0) beside its latest, each labelled with its step."""
    rows = []
    for first, latest in view.first_and_latest():
        cells = []
        for sample in (first, latest) if latest is not first else (first,):
            path = _allowed_image(sample.path, roots, folders)
            picture = (f'<img src="{_thumbnail_uri(path)}" alt="step {sample.step}" style="width:{COMPARE_PX}px;'
                       'image-rendering:pixelated;border-radius:4px">' if path else "(not readable)")
            cells.append(f'<figure style="margin:0;text-align:center">{picture}'
                         f"<figcaption>step {sample.step}</figcaption></figure>")
        if latest is first:
            cells.append('<div style="align-self:center;opacity:.6">the next sample goes here</div>')
        prompt = f'<div style="width:180px;align-self:center">{html.escape(first.prompt)}</div>'
        rows.append(f'<div style="display:flex;gap:12px;align-items:flex-start">{prompt}{"".join(cells)}</div>')
    if not rows:
        return '<div style="opacity:.6">Each sample prompt\'s step-0 image will show here beside its latest.</div>'
    return '<div style="display:flex;flex-direction:column;gap:8px">' + "".join(rows) + "</div>"
