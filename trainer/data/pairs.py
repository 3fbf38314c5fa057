"""Edit pairs: targets in a dataset folder, their references (same file name) in its `conditioning` folder.

The model sees the reference beside the noisy target and learns to produce the target (FLUX.1 Kontext, FLUX.2).
This module holds what pairs add to the torch-free stages:
- health: a target without its reference is skipped and a reference without its target ignored (one row per
  dataset, naming a few of the files); an unreadable reference skips its target; strict pairs whose shapes
  disagree are flagged; an empty or missing conditioning folder is an error;
- planning: the reference's bucket — strict: the target's bucket (cut along the same lines, so an edit stays
  pixel-aligned); loose: the reference's own aspect bucket at the same pixel area (a different framing);
- sampling: which reference image each sample prompt is rendered from, cut to its bucket.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.data.buckets import LATENT_MULTIPLE, Size, bucket_sizes, closest_bucket
from trainer.data.datasets import TrainItem, find_reference, list_images
from trainer.data.health_report import HealthReport, HealthRow
from trainer.data.images import verify_image
from trainer.errors import UserError
from trainer.regular_files import file_problem
from trainer.spec import DatasetEntry, JobSpec

if TYPE_CHECKING:
    from PIL import Image


# A strict pair whose aspect ratios differ by more than this is stretched into the target's bucket: worth a word.
_ASPECT_TOLERANCE = 0.02


def _read_reference(path: Path) -> tuple[Size | None, str]:
    try:
        return verify_image(path), ""
    except UserError as exc:
        return None, str(exc).removeprefix(f"{path}: ")


def check_pairs(report: HealthReport, entries: Sequence[DatasetEntry], workers: int | None = None) -> None:
    """Add the pair rows to a health report whose images are already read; skips targets that cannot pair.

    Called by `check_datasets` before it counts samples, so a dataset left without a single pair is an error.
    Problems shared by many files (targets without a reference, references without a target, strict pairs of
    different shapes) are one row per dataset naming its folder and the first few files; an unreadable reference
    is a row of its own, with why.
    """
    for index, entry in enumerate(entries):
        if not entry.conditioning:
            continue
        folder, dataset = Path(entry.conditioning), Path(entry.path)
        report.reference_folders.append(folder)
        if not folder.is_dir():
            report.rows.append(HealthRow(folder, "the reference folder does not exist; edit pairs need the "
                                                 "reference images", "error", "dataset",
                                         key=f"data.datasets[{index}].conditioning"))
            continue
        references = list_images(folder)
        if not references:
            report.rows.append(HealthRow(folder, "no reference images in the reference folder; add one per target, "
                                                 "named like it", "error", "dataset",
                                         key=f"data.datasets[{index}].conditioning"))
        targets = [info for info in report.images if info.dataset == index and info.path not in report.skipped]
        reference_of = {info.path: find_reference(info.path, folder) for info in targets}
        found = sorted({ref for ref in reference_of.values() if ref is not None})
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            read = dict(zip(found, pool.map(_read_reference, found), strict=True))
        unpaired: list[Path] = []
        stretched: list[str] = []
        for info in targets:
            reference = reference_of[info.path]
            if reference is None:
                unpaired.append(info.path)
                continue
            size, problem = read[reference]
            if size is None:
                report.rows.append(HealthRow(info.path, f"its reference {folder.name}/{reference.name}: {problem}",
                                             "warning", "pair", skipped=True))
                report.skipped.add(info.path)
                continue
            report.reference_sizes[reference] = size
            if entry.match == "strict" and _aspects_differ(info.size, size):
                stretched.append(f"{info.path.name} ({info.size[0]}x{info.size[1]} <- {size[0]}x{size[1]})")
        if unpaired and references:
            report.rows.append(HealthRow(dataset, (
                f"{_count(unpaired, 'target')} without a reference image of the same name in {folder.name}/: "
                f"{_few([p.name for p in unpaired])} (a target trains only with its reference)"),
                "warning", "pair", skipped=True))
        report.skipped.update(unpaired)
        if stretched:
            report.rows.append(HealthRow(dataset, (
                f"{_count(stretched, 'strict pair')} whose reference has another shape: {_few(stretched)}; strict "
                "matching stretches each reference into its target's bucket; set it to \"loose\" unless that is "
                "meant"), "warning", "pair", key=f"data.datasets[{index}].conditioning_match"))
        stems = {path.stem for path in list_images(dataset)} if dataset.is_dir() else set()
        orphans = [reference.name for reference in references if reference.stem not in stems]
        if orphans:
            report.rows.append(HealthRow(folder, f"{_count(orphans, 'reference')} with no target of the same name "
                                                 f"in {dataset.name}/: {_few(orphans)}; ignored", "warning", "pair"))


_SHOWN = 3  # file names a grouped row shows before "and N more"


def _count(things: Sequence[object], noun: str) -> str:
    return f"1 {noun}" if len(things) == 1 else f"{len(things)} {noun}s"


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _aspects_differ(a: Size, b: Size) -> bool:
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1]))) > _ASPECT_TOLERANCE


# ---------------------------------------------------------------------- planning


def loose_bucket(reference_size: Size, target_bucket: Size, resolution: int, step: int, min_side: int) -> Size:
    """The reference's own aspect bucket among the buckets of the target's tier (the same pixel area)."""
    for tier in range(resolution, step - 1, -step):
        sizes = bucket_sizes(tier, step, min_side=min_side)
        if target_bucket in sizes:
            return closest_bucket(reference_size, sizes)
    return target_bucket  # not a bucket of any tier (cannot happen for a planned item): keep the pair aligned


def place_references(items: list[TrainItem], spec: JobSpec, sizes: dict[Path, Size]) -> list[TrainItem]:
    """Every placed item with a reference gets the reference's bucket (see the module doc)."""
    import dataclasses

    match = {Path(e.path): e.match for e in spec.data.datasets if e.conditioning}
    step = spec.data.bucket_step
    placed: list[TrainItem] = []
    for item in items:
        if item.reference_path is not None:
            bucket = item.size
            if match.get(item.image_path.parent) == "loose":
                size = sizes.get(item.reference_path) or _header_size(item.reference_path)
                bucket = loose_bucket(size, item.size, item.resolution, step, min_side=step)
            item = dataclasses.replace(item, reference_bucket=bucket)
        placed.append(item)
    return placed


def _header_size(path: Path) -> Size:
    from trainer.data.images import read_size

    return read_size(path)


def pairs_report(items: list[TrainItem], spec: JobSpec) -> list[str]:
    """Lines for the bucket plan: how many pairs each dataset trains and, loosely matched, where references go."""
    lines: list[str] = []
    for index, entry in enumerate(spec.data.datasets):
        if not entry.conditioning:
            continue
        mine = [item for item in items if item.image_path.parent == Path(entry.path) and item.reference_path]
        how = ("strict: each reference takes its target's bucket and crop" if entry.match == "strict"
               else "loose: each reference in its own aspect bucket at its target's pixel area")
        lines.append(f"edit pairs, data.datasets[{index}]: {len(mine)} placements with a reference from "
                     f"{Path(entry.conditioning).name}/ ({how})")
        if entry.match == "loose":
            moves = Counter((item.size, item.reference_bucket) for item in mine)
            for (target, reference), count in sorted(moves.items()):
                lines.append(f"  target {target[0]}x{target[1]} <- reference {reference[0]}x{reference[1]}: "
                             f"{count}")
    return lines


# ---------------------------------------------------------------------- sampling


def sample_references(spec: JobSpec, items: list[TrainItem], prompts: int) -> list[Path | None]:
    """The reference image of each sample prompt: sample.reference_images (one for all, or one each), else the
    first pair's reference, else none. Raises UserError for a listed path that is not a readable file."""
    given = [Path(p) for p in spec.sample.reference_images]
    for index, path in enumerate(given):
        if (problem := file_problem(path)) is not None:
            raise UserError(f"sample.reference_images[{index}]: '{path}' {problem}; give an image file")
    if len(given) > 1:
        return list(given)
    if not given:
        given = [item.reference_path for item in items if item.reference_path is not None][:1]
    return [given[0] if given else None] * prompts


def reference_for_sampling(path: Path, resolution: int) -> Image.Image:
    """The reference decoded as training decodes it, centre-cut to its aspect bucket at the sample resolution.

    Its size is the size of the sample: the pipelines make the output as large as the reference by default,
    and the model was trained on pairs of one area.
    """
    from trainer.data.images import load_pixels, read_size, to_pil

    side = max(LATENT_MULTIPLE * 4, resolution // LATENT_MULTIPLE * LATENT_MULTIPLE)
    width, height = closest_bucket(read_size(path), bucket_sizes(side, LATENT_MULTIPLE, min_side=LATENT_MULTIPLE * 4))
    return to_pil(load_pixels(path, width, height, "center"))
