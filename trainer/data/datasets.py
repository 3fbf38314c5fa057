"""Image folders with captions: what each training item is, decided before any model loads (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.folders import leads_out
from trainer.spec import DatasetEntry, JobSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class TrainItem:
    """One image as training sees it; after bucketing, one image at one resolution in one bucket."""

    image_path: Path
    caption: str
    resolution: int
    repeats: int
    mask_path: Path | None = None
    is_regularisation: bool = False
    resolutions: tuple[int, ...] = ()  # every resolution the image trains at (the planner reads this)
    crop: str = "center"
    bucket: tuple[int, int] | None = None  # (width, height) once placed; None: a square of `resolution`
    # Edit pairs: the reference image the model sees beside the noisy target, and its (width, height) once
    # placed (the target's bucket when matched strictly, its own aspect bucket when loosely).
    reference_path: Path | None = None
    reference_bucket: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.bucket or (self.resolution, self.resolution)


def list_images(folder: Path) -> list[Path]:
    """The folder's images, leaving out links that lead outside it (`links_out` names them)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and leads_out(p, folder) is None)


def links_out(folder: Path) -> list[tuple[Path, Path]]:
    """(entry, where it leads) of every image or caption in `folder` that is a link leading outside it: never read
    (images, captions, masks and references alike), and named by the health check."""
    wanted = IMAGE_EXTENSIONS + CAPTION_EXTENSIONS
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() in wanted and entry.is_symlink():
            target = leads_out(entry, folder)
            if target is not None:
                found.append((entry, target))
    return found


def caption_file(image_path: Path) -> Path | None:
    """The image's caption file (.txt, else .caption) that stays in its folder; a link out counts as none."""
    for ext in CAPTION_EXTENSIONS:
        sidecar = image_path.with_suffix(ext)
        if sidecar.is_file():
            return sidecar if leads_out(sidecar, image_path.parent) is None else None
    return None


def read_caption(image_path: Path, entry: DatasetEntry) -> str:
    """The caption for one image by the dataset's strategy, with the trigger word in front."""
    if entry.caption_strategy == "instance_prompt":
        caption = entry.instance_prompt
    elif entry.caption_strategy == "filename":
        caption = image_path.stem.replace("_", " ")
    else:
        sidecar = caption_file(image_path)
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar else ""
    caption = " ".join(caption.split())
    if entry.trigger and entry.trigger not in caption:
        caption = f"{entry.trigger} {caption}".strip()
    return caption


def find_mask(image_path: Path, mask_folder: Path) -> Path | None:
    """The mask image with the same name (any image extension) as `image_path`; a link out of the folder is none."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (mask_folder / f"{image_path.stem}{ext}", mask_folder / f"{image_path.stem}{ext.upper()}"):
            if candidate.is_file() and leads_out(candidate, mask_folder) is None:
                return candidate
    return None


def find_reference(image_path: Path, conditioning_folder: Path) -> Path | None:
    """The reference image of an edit pair: the same name as the target, any image extension (like masks)."""
    return find_mask(image_path, conditioning_folder)


def collect_items(spec: JobSpec, usable: set[Path] | None = None) -> list[TrainItem]:
    """Every image of every dataset, in a stable order; paths must already be resolved.

    `usable`: the images the health check passed; others (unreadable, too small) are left out.
    """
    items: list[TrainItem] = []
    for entry in spec.data.datasets:
        resolutions = spec.data.resolutions(entry)
        for image_path in list_images(Path(entry.path)):
            if usable is not None and image_path not in usable:
                continue
            reference = find_reference(image_path, Path(entry.conditioning)) if entry.conditioning else None
            if entry.conditioning and reference is None:
                continue  # a target without its reference cannot train (the health check says so per file)
            items.append(TrainItem(
                image_path=image_path, caption=read_caption(image_path, entry), resolution=resolutions[0],
                repeats=entry.repeats, mask_path=find_mask(image_path, Path(entry.masks)) if entry.masks else None,
                is_regularisation=entry.is_regularisation, resolutions=resolutions, crop=entry.crop,
                reference_path=reference,
            ))
    return items
