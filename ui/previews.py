"""The Run tab's live sampling preview: while a sample renders, the image so far (sample.preview_every), labelled
'sample N/M at step T, denoising step s/S'; hidden when no sample is rendering. It has a timer of its own that
sends a page the preview only when it changed, so the Run tab's poll is untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ui.preview_state import preview_label
from ui.run_state import ACTIVE, RunView
from ui.studio import Studio

PREVIEW_EVERY_S = 1.0  # how often a page asks for a newer preview


def current_preview(view: RunView, allowed: Any = None) -> tuple[str, Any, str]:  # noqa: ANN401 - Folders or None
    """(what is shown, the image, its label): ('', None, '') when no sample is rendering. The image is read from
    the file, which is deleted once the final sample lands: then it is None with the same key, and the next
    change hides it. `allowed` (the app's Folders) must allow the file's folder."""
    with view.lock:
        preview = view.preview if view.status in ACTIVE else None
    if preview is None:
        return "", None, ""
    path = Path(preview.path).resolve()
    if allowed is not None and not allowed.allows(path):
        return "", None, ""
    try:
        from PIL import Image

        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except OSError:  # gone: the sample finished between the event and this read
        image = None
    return preview.path, image, preview_label(preview)


def build(studio: Studio) -> gr.Image:
    """The preview image (hidden until a sample renders) and its timer."""
    image = gr.Image(label="Sample rendering", visible=False, interactive=False, format="jpeg", height=300,
                     elem_id="run-preview")
    sent = gr.State("")  # per page: the preview it shows

    def refresh(last: str) -> tuple[Any, str]:
        key, value, label = current_preview(studio.view, studio.folders)
        if key == last:
            return gr.skip(), last
        if value is None:
            return gr.update(visible=False, value=None), key
        return gr.update(visible=True, value=value, label=label), key

    gr.Timer(PREVIEW_EVERY_S).tick(refresh, sent, [image, sent], api_name="preview", show_progress="hidden",
                                   concurrency_limit=None)
    return image
