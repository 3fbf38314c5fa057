"""The caption editor: a dataset folder's images with their caption sidecars, a page at a time, saved back
atomically (plain python; PIL only for thumbnails, imported when one is made).

Every file it reads or writes must resolve inside the folder that was loaded: a name with a path in it, a
sidecar that is a link to somewhere else, an image linked in from outside, all are refused. The editor's state
is a plain dict (kept per browser session in a gr.State):

    {"folder": str, "names": [image file names], "captions": [text as edited], "originals": [text on disk],
     "page": int, "left_out": int}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.datasets import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, links_out, list_images
from trainer.errors import UserError
from trainer.files import write_text_atomic
from trainer.folders import leads_out

PAGE_SIZE = 12
THUMBNAIL_SIZE = 256  # pixels on the longer side
SIDECAR = ".txt"  # what the editor writes; datasets read .txt first

EditorState = dict[str, Any]


@dataclass
class SaveResult:
    changed: list[str] = field(default_factory=list)  # image names whose caption was written
    problems: list[str] = field(default_factory=list)

    def message(self) -> str:
        text = f"saved {len(self.changed)} changed caption{'' if len(self.changed) == 1 else 's'}"
        if not self.changed and not self.problems:
            text = "nothing changed: no caption written"
        if self.problems:
            text += f"; {len(self.problems)} not saved: " + "; ".join(self.problems)
        return text


def empty_state() -> EditorState:
    return {"folder": "", "names": [], "captions": [], "originals": [], "page": 0, "left_out": 0}


# ---------------------------------------------------------------------- paths


def _inside(folder: Path, name: str) -> Path:
    """`folder/name` for a bare file name whose path, links followed, stays in `folder` (already resolved)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(f"{name!r}: not a file name in the dataset folder; refused")
    path = folder / name
    if leads_out(path, folder) is not None or path.resolve() == folder:
        raise UserError(f"{name}: resolves outside the dataset folder {folder}; refused")
    return path


def sidecar_path(folder: str | Path, image_name: str) -> Path:
    """Where the editor writes an image's caption: `<stem>.txt` beside it, checked to stay in the folder."""
    folder = Path(folder).resolve()
    _inside(folder, image_name)
    return _inside(folder, Path(image_name).stem + SIDECAR)


def read_caption_file(folder: str | Path, image_name: str) -> str:
    """The image's caption as datasets read it (.txt, else .caption), stripped; '' when it has none."""
    folder = Path(folder).resolve()
    for extension in CAPTION_EXTENSIONS:
        sidecar = _inside(folder, Path(image_name).stem + extension)
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return ""


# ---------------------------------------------------------------------- load, page, save


def load_folder(folder: str | Path) -> EditorState:
    """Every image of the folder with its caption; raises UserError when the folder does not exist."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"the image folder {folder} does not exist")
    folder = folder.resolve()
    state = empty_state()
    state["folder"] = str(folder)
    # images linked in from outside: list_images leaves them out; counted so the page says so
    state["left_out"] = sum(path.suffix.lower() in IMAGE_EXTENSIONS for path, _ in links_out(folder))
    for image in list_images(folder):
        try:
            _inside(folder, image.name)
            caption = read_caption_file(folder, image.name)
        except (UserError, OSError):
            state["left_out"] += 1  # linked in from outside, or its caption is: not shown, never written
            continue
        state["names"].append(image.name)
        state["captions"].append(caption)
        state["originals"].append(caption)
    return state


def page_count(state: EditorState) -> int:
    return max(1, -(-len(state["names"]) // PAGE_SIZE))


def page_indices(state: EditorState, page: int | None = None) -> range:
    """Indices into names/captions of a page (the current one by default), clamped to the pages there are."""
    page = min(max(0, state["page"] if page is None else page), page_count(state) - 1)
    return range(page * PAGE_SIZE, min((page + 1) * PAGE_SIZE, len(state["names"])))


def go_to_page(state: EditorState, page: int) -> EditorState:
    return dict(state, page=min(max(0, page), page_count(state) - 1))


def keep_edits(state: EditorState, texts: list[Any]) -> EditorState:
    """The state with the current page's text boxes (one per slot, in order) taken in."""
    captions = list(state["captions"])
    for index, text in zip(page_indices(state), texts, strict=False):
        captions[index] = "" if text is None else str(text)
    return dict(state, captions=captions)


def changed_count(state: EditorState) -> int:
    return sum(1 for edited, original in zip(state["captions"], state["originals"], strict=True)
               if edited.strip() != original.strip())


def save_captions(state: EditorState) -> tuple[EditorState, SaveResult]:
    """Write every caption that differs from what was loaded; returns the new state (written captions become
    the originals) and what was saved.

    A caption whose file changed on disk since it was loaded (another editor, the captioner) is not
    overwritten: load again to see it. Nothing is written outside the loaded folder.
    """
    result = SaveResult()
    if not state.get("folder"):
        result.problems.append("no folder loaded: Load captions first")
        return state, result
    folder = Path(state["folder"])
    originals, captions = list(state["originals"]), list(state["captions"])
    for index, (name, edited) in enumerate(zip(state["names"], captions, strict=True)):
        if edited.strip() == originals[index].strip():
            continue
        text = " ".join(edited.split())  # one line, as training reads it
        try:
            target = sidecar_path(folder, name)
            if read_caption_file(folder, name) != originals[index].strip():
                result.problems.append(f"{name}: its caption changed on disk since it was loaded; not overwritten "
                                       "(Load captions again)")
                continue
            write_text_atomic(target, text + "\n")
        except (UserError, OSError) as exc:
            result.problems.append(str(exc) if isinstance(exc, UserError) else f"{name}: {exc}")
            continue
        originals[index] = captions[index] = text
        result.changed.append(name)
    return dict(state, originals=originals, captions=captions), result


def thumbnail(state: EditorState, index: int) -> Any:  # noqa: ANN401 - a PIL image, or None
    """A small upright RGB copy of an image for the page (None when it cannot be read)."""
    from PIL import Image, ImageOps

    try:
        path = _inside(Path(state["folder"]), state["names"][index])
        with Image.open(path) as opened:
            opened.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEGs decode at a reduced scale
            image = ImageOps.exif_transpose(opened)
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            return image.convert("RGB")
    except (UserError, OSError, ValueError, Image.DecompressionBombError):
        return None
