"""The upload area, on the Quick start and the Dataset tab: drop images with their captions or a zip, choose the
dataset's name (new or existing) and what happens to files already there; then thumbnails of the folder. The rules
are ui/uploads.py's; this is only the layout and the messages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.data.datasets import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, list_images
from ui.studio import Studio
from ui.uploads import DATASETS_DIR, KEEP, REPLACE, ZIP_EXTENSION, UploadResult, list_datasets

THUMBNAILS = 24  # the first images of the folder; the caption editor shows them all
THUMBNAIL_PX = 160


@dataclass
class UploadArea:
    files: gr.File
    name: gr.Dropdown
    existing: gr.Radio
    message: gr.Markdown
    thumbnails: gr.Gallery


def result_markdown(result: UploadResult) -> str:
    """The outcome, then one line per refused file (its name and the rule) and per note."""
    if result.folder is None:  # the message is the first refusal
        head, rest = f"**{result.message()}**", result.refused[1:]
    else:
        head, rest = result.message(), result.refused
    return "\n".join([head, *(f"- {line}" for line in [*rest, *result.notes])])


def thumbnails(folder: Path | None) -> list[tuple[Any, str]]:
    """Small copies of the folder's first images, each with its name (the folder is not one gradio serves)."""
    if folder is None or not folder.is_dir():
        return []
    from PIL import Image

    items = []
    for path in list_images(folder)[:THUMBNAILS]:
        try:
            with Image.open(path) as image:
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                items.append((image.convert("RGB"), path.name))
        except (OSError, ValueError):
            continue  # the dataset check names an unreadable image
    return items


def build(studio: Studio, elem_id: str, default_name: str = "my_dataset") -> UploadArea:
    types = [*IMAGE_EXTENSIONS, *CAPTION_EXTENSIONS, ZIP_EXTENSION]
    limits = studio.upload_limits
    with gr.Row(equal_height=False):
        files = gr.File(file_count="multiple", file_types=types, type="filepath", scale=3, elem_id=elem_id,
                        label=f"Drop images ({', '.join(IMAGE_EXTENSIONS)}) with same-named .txt captions, or a .zip "
                              f"of them — at most {limits.describe()}")
        with gr.Column(scale=2):
            name = gr.Dropdown(choices=list_datasets(studio.folders), value=default_name, allow_custom_value=True,
                               label="Dataset name", info=f"a new or existing folder: {DATASETS_DIR}/<name> in the "
                                                          "workdir")
            existing = gr.Radio(choices=[("keep existing files", KEEP), ("replace existing files", REPLACE)],
                                value=KEEP, label="Files already in the folder")
    message = gr.Markdown("", elem_id=f"{elem_id}-message")
    gallery = gr.Gallery(label="Images in the dataset", columns=10, height=150, visible=False, object_fit="cover",
                         elem_id=f"{elem_id}-thumbnails")
    return UploadArea(files, name, existing, message, gallery)


def connect(area: UploadArea, studio: Studio, folder_boxes: list[gr.components.Component]) -> None:
    """Uploading writes the files and puts the dataset folder into `folder_boxes` (the form's image folder, the quick
    start's), so the dataset check, the captioner and the caption editor work on it."""

    def upload(paths: list[str] | None, name: str, existing: str) -> list[Any]:
        if not paths:
            return [gr.skip()] * (4 + len(folder_boxes))
        result = studio.upload_dataset([(path, Path(path).name) for path in paths], name, existing)
        for problem in result.refused[:3]:
            gr.Warning(problem)
        folder = [str(result.folder)] * len(folder_boxes) if result.folder else [gr.skip()] * len(folder_boxes)
        shown = thumbnails(result.folder)
        choices = gr.update(choices=list_datasets(studio.folders),
                            value=result.folder.name if result.folder else name)
        return [result_markdown(result), gr.update(value=shown, visible=bool(shown)), None, choices, *folder]

    area.files.upload(upload, [area.files, area.name, area.existing],
                      [area.message, area.thumbnails, area.files, area.name, *folder_boxes],
                      api_visibility="private", show_progress="full")
