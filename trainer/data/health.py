"""Dataset health: every file of every dataset read and decoded once before training (no torch).

What it finds, one row per file and problem:
- error (the job will not train as it stands): a dataset folder missing or without images, a dataset whose
  every image is skipped, fewer samples than one batch;
- warning (training goes ahead): a file that cannot be read or is truncated, an image below the minimum
  size, an unreadable mask (these three: the image is skipped), files in the folder that are not training
  images (ignored), a missing or empty caption file, exact duplicates, fewer samples than one optimiser step;
  edit pairs (see pairs.py): a target without its reference (skipped), a reference without its target.

The report and its rows are in health_report.py. A file that fails here is left out of training
(`usable_images`), so a bad file never stops a run midway. Each file is read once, hashed and fully decoded from
the same bytes by the decoder training uses (JPEGs at reduced scale: the whole stream is still decoded), on a few
threads (Pillow and hashlib release the GIL).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trainer.data.datasets import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, find_mask, links_out, list_images
from trainer.data.health_report import HealthReport, HealthRow, ImageInfo, Kind, display_path, usable_images
from trainer.data.images import decode_small, verify_mask
from trainer.data.near_duplicates import Fingerprint, fingerprint, likely_duplicates
from trainer.data.pairs import check_pairs
from trainer.errors import UserError
from trainer.folders import leads_out
from trainer.spec import DatasetEntry, JobSpec

# Left alone without a word: what file managers and editors drop into folders.
_SILENT_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}
# Image formats users have that the trainer does not read: worth a hint to convert them.
_OTHER_IMAGE_EXTENSIONS = {".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".raw",
                           ".cr2", ".nef", ".arw", ".dng", ".jp2", ".ico"}


# ---------------------------------------------------------------------- reading the files


@dataclass(frozen=True)
class _Scan:
    size: tuple[int, int] | None = None
    sha256: str = ""
    error: str = ""
    fingerprint: Fingerprint | None = None


def _without_path(exc: UserError, path: Path) -> str:
    return str(exc).removeprefix(f"{path}: ")  # the row names the file already


def _scan(path: Path) -> _Scan:
    """Read once, hash, decode from the same bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _Scan(error=f"cannot read this file ({exc.strerror or exc})")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image, size = decode_small(path, data)
        return _Scan(size, digest, fingerprint=fingerprint(image))
    except UserError as exc:
        return _Scan(sha256=digest, error=_without_path(exc, path))


def _scan_mask(path: Path) -> str:
    try:
        verify_mask(path)
    except UserError as exc:
        return _without_path(exc, path)
    return ""


def _caption_problem(image: Path, trigger: str) -> str:
    """What is wrong with an image's caption file (caption_strategy 'textfile'), or ''."""
    fallback = f"the trigger word '{trigger}' alone" if trigger else "an empty caption"
    for ext in CAPTION_EXTENSIONS:
        sidecar = image.with_suffix(ext)
        if sidecar.is_file():
            if leads_out(sidecar, image.parent) is not None:
                return f"caption file {sidecar.name} leads outside the folder (see its row); it trains with {fallback}"
            try:
                text = sidecar.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                return f"caption file {sidecar.name} is not UTF-8 text; its odd characters become �"
            except OSError as exc:
                return f"caption file {sidecar.name} cannot be read ({exc.strerror or exc})"
            return "" if text.strip() else f"caption file {sidecar.name} is empty; it trains with {fallback}"
    return f"no caption file ({image.stem}.txt); it trains with {fallback}"


def _stray_files(folder: Path, own: Sequence[str]) -> list[HealthRow]:
    """Everything in a dataset folder that is not a training image or its caption; `own`: the dataset's mask and
    conditioning folders, which may live inside it."""
    rows: list[HealthRow] = []
    owned = {Path(path).resolve() for path in own if path}
    entries = sorted(folder.iterdir())
    image_stems = {p.stem for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    for path in entries:
        name, suffix = path.name.lower(), path.suffix.lower()
        if name in _SILENT_NAMES or name.startswith("."):
            continue
        if suffix in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS and leads_out(path, folder) is not None:
            continue  # a row of its own (`_link_rows`)
        if path.is_dir():
            if path.resolve() not in owned:
                rows.append(HealthRow(path, "a subfolder: not searched (images must be directly in the dataset "
                                            "folder)", "warning", "ignored"))
        elif suffix in IMAGE_EXTENSIONS:
            continue
        elif suffix in CAPTION_EXTENSIONS:
            if path.stem not in image_stems:
                rows.append(HealthRow(path, "a caption with no image of the same name; ignored", "warning",
                                      "ignored"))
        elif suffix in _OTHER_IMAGE_EXTENSIONS:
            rows.append(HealthRow(path, f"{suffix} images are not read (only {', '.join(IMAGE_EXTENSIONS)}); "
                                        "ignored — convert it to PNG or JPEG to train on it", "warning", "ignored"))
        else:
            rows.append(HealthRow(path, "not a training image; ignored", "warning", "ignored"))
    return rows


def _link_rows(entry: DatasetEntry) -> list[HealthRow]:
    """A row naming each image, caption, mask or reference of the entry's folders that links outside its folder."""
    rows = []
    for what, folder in (("dataset", entry.path), ("mask", entry.masks), ("reference", entry.conditioning or "")):
        if folder and Path(folder).is_dir():
            rows += [HealthRow(path, f"a link to {target}, outside the {what} folder: refused, never read; copy the "
                                     "file into the folder to use it", "warning", "link")
                     for path, target in links_out(Path(folder))]
    return rows


def _mask_of(entry: DatasetEntry, image: Path) -> Path | None:
    return find_mask(image, Path(entry.masks)) if entry.masks and Path(entry.masks).is_dir() else None


# ---------------------------------------------------------------------- the check


def check_datasets(datasets: JobSpec | Sequence[DatasetEntry], min_size: int | None = None,
                   batch_size: int | None = None, gradient_accumulation: int | None = None, *,
                   held_out: int | None = None, workers: int | None = None) -> HealthReport:
    """Check every dataset of a resolved spec, or a list of entries with resolved paths.

    With a spec, arguments left None come from it: data.min_size (when the spec has the key),
    train.batch_size, train.gradient_accumulation, data.eval_holdout (images at the end of the first dataset
    kept out of training). `min_size`: the shorter side, in pixels, below which an image is skipped (0 or
    None: no floor; the bucket plan still skips what no bucket can take).
    """
    if isinstance(datasets, JobSpec):
        spec = datasets
        entries = list(spec.data.datasets)
        min_size = getattr(spec.data, "min_size", 0) if min_size is None else min_size
        batch_size = spec.train.batch_size if batch_size is None else batch_size
        if gradient_accumulation is None:
            gradient_accumulation = spec.train.gradient_accumulation
        held_out = spec.data.eval_holdout if held_out is None else held_out
    else:
        entries = list(datasets)
    min_size, held_out = min_size or 0, held_out or 0
    batch_size, gradient_accumulation = batch_size or 1, gradient_accumulation or 1

    report = HealthReport([Path(entry.path) for entry in entries])
    if not entries:
        report.rows.append(HealthRow(Path("data.datasets"), "no dataset given; add one with a `path` to a folder "
                                     "of images", "error", "dataset", key="data.datasets"))
        return report

    listed = [(index, image) for index, entry in enumerate(entries) for image in _list_dataset(report, index, entry)]
    report.image_count = len(listed)

    mask_of = {path: _mask_of(entries[index], path) for index, path in listed}
    masks = sorted({mask for mask in mask_of.values() if mask is not None})
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        scans = list(pool.map(_scan, [path for _, path in listed]))
        mask_errors = dict(zip(masks, pool.map(_scan_mask, masks), strict=True))

    kept: list[tuple[Path, _Scan]] = []
    for (index, path), scan in zip(listed, scans, strict=True):
        entry = entries[index]
        skip = _skip_reason(scan, min_size, mask_of[path], mask_errors)
        if scan.size is not None:
            report.images.append(ImageInfo(path, scan.size, scan.sha256, index))
        if skip is not None:
            setting = {"too small": "data.min_size", "mask": f"data.datasets[{index}].masks"}.get(skip[0], "")
            report.rows.append(HealthRow(path, skip[1], "warning", skip[0], skipped=True, key=setting))
            report.skipped.add(path)
            continue  # nothing more worth saying about a file left out
        if entry.caption_strategy == "textfile":
            problem = _caption_problem(path, entry.trigger)
            if problem:
                report.rows.append(HealthRow(path, problem, "warning", "caption"))
        kept.append((path, scan))
    report.rows += _duplicates(report, kept)

    if any(entry.conditioning for entry in entries):
        check_pairs(report, entries, workers)
    elif isinstance(datasets, JobSpec):
        report.rows += _edit_model_without_pairs(datasets)
    listed_per_dataset = [sum(1 for index, _ in listed if index == i) for i in range(len(entries))]
    _check_counts(report, entries, listed_per_dataset, batch_size, gradient_accumulation, held_out)
    return report


def _list_dataset(report: HealthReport, index: int, entry: DatasetEntry) -> list[Path]:
    """The training images of one dataset folder; rows for a folder that is missing, unreadable or without images,
    and for the files in it that are not training images."""
    folder, key = Path(entry.path), f"data.datasets[{index}].path"
    if not folder.is_dir():
        report.rows.append(HealthRow(folder, "dataset folder does not exist; give the folder that holds the images",
                                     "error", "dataset", key=key))
        return []
    if not os.access(folder, os.R_OK | os.X_OK):  # listing it would raise PermissionError
        report.rows.append(HealthRow(folder, "cannot read this folder (permission denied); allow reading it or copy "
                                             "the images to a folder you can read", "error", "dataset", key=key))
        return []
    report.rows += _stray_files(folder, (entry.masks, entry.conditioning or "")) + _link_rows(entry)
    images = list_images(folder)
    if not images:
        report.rows.append(HealthRow(folder, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder; add images "
                                             "or give the folder that holds them", "error", "dataset", key=key))
    return images


def _duplicates(report: HealthReport, scans: list[tuple[Path, _Scan]]) -> list[HealthRow]:
    """Rows for the same file twice (its bytes) and, among distinct files, the same picture saved again (a
    perceptual fingerprint: near_duplicates.py), each naming both files."""
    rows: list[HealthRow] = []
    first_seen: dict[str, Path] = {}
    printed: list[tuple[Path, Fingerprint]] = []
    for path, scan in scans:
        if scan.sha256 in first_seen:
            original = display_path(report.datasets, first_seen[scan.sha256])
            rows.append(HealthRow(path, f"the same file as {original}: it trains twice as often; delete one unless "
                                        "you mean it", "warning", "duplicate"))
            continue
        first_seen[scan.sha256] = path
        if scan.fingerprint is not None:
            printed.append((path, scan.fingerprint))
    for path, original in likely_duplicates(printed):
        rows.append(HealthRow(path, f"looks like {display_path(report.datasets, original)} (the same picture saved "
                                    "again, e.g. as JPEG): likely a duplicate, which trains twice as often; delete one "
                                    "unless you mean it", "warning", "duplicate"))
    return rows


def _edit_model_without_pairs(spec: JobSpec) -> list[HealthRow]:
    """A flavour made to edit an input image (Kontext) trained without a single edit pair: worth a word."""
    from trainer import registry

    flavour = registry.get_flavour(spec.model.family, spec.model.flavour)
    if not flavour.needs_reference_image:
        return []
    key = "data.datasets[0].conditioning"
    return [HealthRow(Path(key), f"{flavour.label} edits a reference image, but no dataset has a conditioning "
                      "folder: it trains on the targets alone (text to image); give the folder of reference images if "
                      "it should learn an edit", "warning", "pair", key=key)]


def _skip_reason(scan: _Scan, min_size: int, mask: Path | None,
                 mask_errors: dict[Path, str]) -> tuple[Kind, str] | None:
    if scan.error or scan.size is None:
        return "unreadable", scan.error
    if min(scan.size) < min_size:
        return "too small", (f"{scan.size[0]}x{scan.size[1]} is below the minimum size ({min_size} pixels on the "
                             "shorter side)")
    if mask is not None and mask_errors.get(mask):
        return "mask", f"its mask {mask.name}: {mask_errors[mask]}"
    return None


def _check_counts(report: HealthReport, entries: list[DatasetEntry], listed: list[int], batch_size: int,
                  accumulation: int, held_out: int) -> None:
    """Datasets left empty by skipped files, and too few samples for a batch or an optimiser step."""
    usable = set(usable_images(report))
    per_dataset = [sum(1 for info in report.images if info.dataset == i and info.path in usable)
                   for i in range(len(entries))]
    for index, entry in enumerate(entries):
        if listed[index] and not per_dataset[index]:
            report.rows.append(HealthRow(Path(entry.path), "no usable image in this dataset (every one is skipped, "
                                                           "see their rows)", "error", "dataset",
                                         key=f"data.datasets[{index}].path"))
    samples = sum(count * entry.repeats for count, entry in zip(per_dataset, entries, strict=True))
    samples -= min(held_out, per_dataset[0]) * entries[0].repeats
    report.samples = max(samples, 0)
    if not report.samples:
        return  # said above: per dataset, or no images at all
    if report.samples < batch_size:
        report.rows.append(HealthRow(Path("train.batch_size"), f"{report.samples} samples (images × repeats) "
                                     f"cannot fill one batch of {batch_size}; lower it or add images", "error",
                                     "count", key="train.batch_size"))
    elif report.samples < batch_size * accumulation:
        report.rows.append(HealthRow(Path("train.gradient_accumulation"), f"{report.samples} samples are fewer "
                                     f"than one optimiser step takes ({batch_size} × {accumulation}); every step "
                                     "repeats some images", "warning", "count", key="train.gradient_accumulation"))
