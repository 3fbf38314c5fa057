"""The Run tab's live sampling preview: while a sample renders, the image so far (sample.preview_every), labelled
'sample N/M at step T, denoising step s/S'; hidden when no sample is rendering. It has a timer of its own that
sends a page the preview only when it changed, so the Run tab's poll is untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from trainer.events import SamplePreview
from ui.preview_state import preview_label
from ui.run_state import ACTIVE, RunView
from ui.studio import Studio

PREVIEW_EVERY_S = 1.0  # how often a page asks for a newer preview


def live_preview(view: RunView, allowed: Any = None) -> SamplePreview | None:  # noqa: ANN401 - Folders or None
    """The preview of the sample rendering now; None when none is (or its file is outside what `allowed`, the
    app's Folders, allows)."""
    with view.lock:
        preview = view.preview if view.status in ACTIVE else None
    if preview is None or (allowed is not None and not allowed.allows(Path(preview.path).resolve())):
        return None
    return preview


def preview_image(preview: SamplePreview) -> Any:  # noqa: ANN401 - a PIL image, or None
    """The preview's image; None when its file is gone (the final sample landed between the event and now)."""
    from PIL import Image

    try:
        with Image.open(preview.path) as opened:
            return opened.convert("RGB")
    except OSError:
        return None


def build(studio: Studio) -> gr.Image:
    """The preview image (hidden until a sample renders) and its timer."""
    image = gr.Image(label="Sample rendering", visible=False, interactive=False, format="jpeg", height=300,
                     elem_id="run-preview")
    sent = gr.State("")  # per page: the preview it shows

    def refresh(last: str) -> tuple[Any, str]:
        preview = live_preview(studio.view, studio.folders)
        key = preview.path if preview is not None else ""
        if key == last:
            return gr.skip(), last
        image = preview_image(preview) if preview is not None else None
        if image is None:
            return gr.update(visible=False, value=None), key
        return gr.update(visible=True, value=image, label=preview_label(preview)), key

    gr.Timer(PREVIEW_EVERY_S).tick(refresh, sent, [image, sent], api_name="preview", show_progress="hidden",
                                   concurrency_limit=None)
    return image
