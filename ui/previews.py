"""The Run tab's live sampling preview: while a sample renders, the image so far (sample.preview_every), labelled
'sample N/M at step T, denoising step s/S'; hidden when no sample is rendering. The Run tab's browser-side poll
sets a hidden box to the published preview's key (ui/run_publisher.py) and only its change asks the server for the
image: a page costs one request per new preview, none while nothing renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from trainer.events import SamplePreview
from ui.preview_state import preview_label
from ui.run_state import ACTIVE, RunView
from ui.studio import Studio


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


def build(studio: Studio) -> gr.Textbox:
    """The preview image (hidden until a sample renders); returns the hidden box the Run tab's poll sets to the
    published preview's key, whose change sends the image."""
    image = gr.Image(label="Sample rendering", visible=False, interactive=False, format="jpeg", height=300,
                     elem_id="run-preview")
    seen = gr.Textbox("", visible="hidden", elem_id="run-preview-seen")

    def refresh() -> Any:  # noqa: ANN401 - a gradio update
        preview = live_preview(studio.view, studio.folders)
        image = preview_image(preview) if preview is not None else None
        if image is None:
            return gr.update(visible=False, value=None)
        return gr.update(visible=True, value=image, label=preview_label(preview))

    seen.change(refresh, None, image, api_name="preview", show_progress="hidden", concurrency_limit=None)
    return seen
