"""Aspect-ratio buckets: which (width, height) each image trains at, decided before any model loads (no torch).

A resolution names a pixel area, resolution²; its buckets are the (width, height) pairs, both multiples of
`step`, with about that area (never more, so a batch never costs more memory than the square) and an aspect
ratio within `max_ratio`. An image goes to the bucket whose aspect ratio is closest to its own; it is scaled
to cover the bucket and the overflow is cropped.

An image too small to fill that bucket without being enlarged more than `max_upscale` times goes down a tier:
the buckets of resolution − step, then − 2·step, …, down to `min_side`, and it lands at the largest tier it
can fill (closest ratio there). Below the last tier it is skipped. So a 700×700 photo in a 1024 job with
max_upscale 1.0 trains at 640×640, not blown up to 1024×1024; with max_upscale 1.5 it trains at 1024×1024.

Several resolutions train at once (multi-resolution): each image is placed once per resolution.

FLUX needs latent grids of whole 2×2 patches after the VAE's 8× reduction, so sides are multiples of 16 and
`step` must be one too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trainer.data.images import read_size
from trainer.errors import UserError

LATENT_MULTIPLE = 16  # VAE ×8, then 2×2 patches
DEFAULT_STEP = 64
DEFAULT_MIN_SIDE = 256
DEFAULT_MAX_RATIO = 4.0
AREA_TOLERANCE = 0.10  # a bucket's area is within this fraction below resolution²

Size = tuple[int, int]  # (width, height)


def _check(resolution: int, step: int, min_side: int, max_ratio: float) -> None:
    if step <= 0 or step % LATENT_MULTIPLE:
        raise ValueError(f"bucket step {step}: must be a positive multiple of {LATENT_MULTIPLE} "
                         "(FLUX latents are 8× smaller and packed in 2×2 patches)")
    if resolution < step or resolution % step:
        raise ValueError(f"resolution {resolution}: must be a multiple of the bucket step {step}")
    if min_side <= 0:
        raise ValueError(f"min_side {min_side}: must be positive")
    if max_ratio < 1:
        raise ValueError(f"max_ratio {max_ratio}: must be at least 1")


@functools.cache
def _bucket_sizes(resolution: int, step: int, min_side: int, max_ratio: float) -> tuple[Size, ...]:
    area = resolution * resolution
    shortest = max(step, math.ceil(min(min_side, resolution) / step) * step)
    sizes: set[Size] = set()
    for short in range(shortest, resolution + 1, step):
        long = (area // short) // step * step  # the longest side that keeps the area at most resolution²
        if long < short:
            break
        if long / short > max_ratio + 1e-9 or long * short < (1 - AREA_TOLERANCE) * area:
            continue
        sizes.update({(long, short), (short, long)})
    return tuple(sorted(sizes, key=lambda s: (s[0] / s[1], s)))


def bucket_sizes(resolution: int, step: int = DEFAULT_STEP, min_side: int = DEFAULT_MIN_SIDE,
                 max_ratio: float = DEFAULT_MAX_RATIO) -> list[Size]:
    """Every (width, height) bucket of a resolution, tallest first: multiples of `step`, area within 10% below
    resolution², no side under `min_side` (or the resolution, when smaller), aspect ratio at most `max_ratio`."""
    _check(resolution, step, min_side, max_ratio)
    return list(_bucket_sizes(resolution, step, min_side, float(max_ratio)))


def _ratio_distance(a: Size, b: Size) -> float:
    return abs(math.log(a[0] / a[1]) - math.log(b[0] / b[1]))


def upscale_needed(image_size: Size, bucket: Size) -> float:
    """How many times the image is enlarged to cover the bucket (below 1: it is reduced)."""
    return max(bucket[0] / image_size[0], bucket[1] / image_size[1])


def crop_share(image_size: Size, bucket: Size) -> float:
    """The fraction of the image's area cut away when it covers the bucket."""
    scale = upscale_needed(image_size, bucket)
    return 1 - (bucket[0] * bucket[1]) / (image_size[0] * image_size[1] * scale * scale)


def closest_bucket(image_size: Size, sizes: Sequence[Size]) -> Size:
    """The bucket with the aspect ratio nearest the image's (ties: the first, i.e. the taller)."""
    return min(sizes, key=lambda bucket: _ratio_distance(image_size, bucket))


def assign_bucket(image_size: Size, resolution: int, step: int = DEFAULT_STEP, max_upscale: float = 1.0, *,
                  min_side: int = DEFAULT_MIN_SIDE, max_ratio: float = DEFAULT_MAX_RATIO) -> Size | None:
    """The bucket an image of `image_size` (width, height) trains in at `resolution`, or None if too small.

    The closest aspect ratio at the largest tier (resolution, resolution − step, …) the image covers without
    being enlarged more than `max_upscale` times; None when it cannot fill even the smallest tier.
    """
    _check(resolution, step, min_side, max_ratio)
    if max_upscale <= 0:
        raise ValueError(f"max_upscale {max_upscale}: must be positive")
    if image_size[0] <= 0 or image_size[1] <= 0:
        return None
    lowest = max(step, math.ceil(min(min_side, resolution) / step) * step)
    for tier in range(resolution, lowest - 1, -step):
        bucket = closest_bucket(image_size, _bucket_sizes(tier, step, min_side, float(max_ratio)))
        if upscale_needed(image_size, bucket) <= max_upscale + 1e-9:
            return bucket
    return None


# ---------------------------------------------------------------------- planning a whole dataset


class PlannedItem(Protocol):
    """What the planner reads of an item (trainer.data.datasets.TrainItem fits)."""

    image_path: Path
    repeats: int


@dataclass(frozen=True)
class Placement:
    """One image at one resolution: the latents the session caches and batches by `bucket`."""

    item_index: int  # index into the items given to plan_buckets
    image_path: Path
    resolution: int
    bucket: Size  # (width, height)
    repeats: int
    image_size: Size
    upscale: float  # above 1: enlarged; below: reduced
    crop_share: float  # fraction of the image cut away

    @property
    def downsized(self) -> bool:
        """Trained at a lower tier than its resolution because it is too small (see the module doc)."""
        return self.bucket[0] * self.bucket[1] < (1 - AREA_TOLERANCE) * self.resolution ** 2


@dataclass(frozen=True)
class SkippedImage:
    image_path: Path
    resolution: int | None  # None: skipped at every resolution (unreadable)
    reason: str


@dataclass(frozen=True)
class BucketCount:
    images: int
    samples: int  # images × repeats: what one epoch draws from the bucket


@dataclass
class BucketPlan:
    resolutions: tuple[int, ...]
    step: int
    max_upscale: float
    batch_size: int
    placements: list[Placement] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # more lines for the report (edit pairs: see pairs.py)

    def by_bucket(self) -> dict[Size, list[Placement]]:
        """Placements grouped by bucket size (what one batch may mix), largest area first."""
        groups: dict[Size, list[Placement]] = {}
        for placement in self.placements:
            groups.setdefault(placement.bucket, []).append(placement)
        return dict(sorted(groups.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0][0] / kv[0][1])))

    def counts(self, resolution: int | None = None) -> dict[Size, BucketCount]:
        """Images and samples per bucket, for one resolution or all."""
        counts: dict[Size, BucketCount] = {}
        for bucket, placements in self.by_bucket().items():
            chosen = [p for p in placements if resolution is None or p.resolution == resolution]
            if chosen:
                counts[bucket] = BucketCount(len(chosen), sum(p.repeats for p in chosen))
        return counts

    @property
    def samples(self) -> int:
        """Samples in one epoch (repeats counted) before partial batches are dropped."""
        return sum(p.repeats for p in self.placements)

    def unbatched(self) -> dict[Size, int]:
        """Samples per bucket left out of every epoch because they do not fill a whole batch."""
        leftover = {bucket: count.samples % self.batch_size for bucket, count in self.counts().items()}
        return {bucket: n for bucket, n in leftover.items() if n}

    def report(self) -> str:
        """A plain-text table a user reads before training."""
        lines = [f"Buckets: {len(self.by_bucket())} for {self.samples} samples per epoch "
                 f"(step {self.step}, enlarging at most {self.max_upscale:g}x, batch size {self.batch_size})"]
        unbatched, every = self.unbatched(), self.counts()
        for resolution in self.resolutions:
            counts = self.counts(resolution)
            images = sum(c.images for c in counts.values())
            samples = sum(c.samples for c in counts.values())
            lines.append("")
            lines.append(f"resolution {resolution}: {images} images, {samples} with repeats")
            if not counts:
                lines.append("  no image is large enough for this resolution")
                continue
            rows = [("bucket", "aspect", "images", "with repeats", "note")]
            for bucket, count in counts.items():
                notes = []
                if bucket[0] * bucket[1] < (1 - AREA_TOLERANCE) * resolution ** 2:
                    notes.append("smaller tier: images too small to enlarge")
                if bucket in unbatched:
                    if unbatched[bucket] == every[bucket].samples:
                        notes.append("fewer than a batch: never trained")
                    else:
                        notes.append(f"{unbatched[bucket]} left out of each epoch (partial batch)")
                rows.append((f"{bucket[0]}x{bucket[1]}", _aspect(bucket), str(count.images), str(count.samples),
                             "; ".join(notes)))
            lines += _columns(rows, right=(2, 3))
        cropped = [p for p in self.placements if p.crop_share > 0.25]
        if cropped:
            lines.append("")
            names = sorted({f"{p.image_path.name} ({p.crop_share:.0%})" for p in cropped})
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"cropped by more than a quarter (aspect ratio beyond the buckets'): {shown}")
        if self.skipped:
            lines.append("")
            lines.append(f"skipped ({len(self.skipped)}):")
            for skip in self.skipped:
                where = f" at {skip.resolution}" if skip.resolution else ""
                lines.append(f"  {skip.image_path.name}{where}: {skip.reason}")
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)


def _aspect(bucket: Size) -> str:
    w, h = bucket
    if w == h:
        return "1:1"
    return f"{w / h:.2f}:1" if w > h else f"1:{h / w:.2f}"


def _columns(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def plan_buckets(items: Sequence[PlannedItem], resolutions: int | Iterable[int], *,
                 sizes: Mapping[Path, Size] | None = None, step: int = DEFAULT_STEP, max_upscale: float = 1.0,
                 min_side: int = DEFAULT_MIN_SIDE, max_ratio: float = DEFAULT_MAX_RATIO,
                 batch_size: int = 1) -> BucketPlan:
    """Place every item at every resolution (an item with its own `resolutions` attribute, a non-empty tuple,
    uses those instead).

    `sizes` maps image paths to upright (width, height), e.g. `HealthReport.sizes` (every file already
    decoded once); other images have their header read. Unreadable images and images too small for any bucket
    are listed in `skipped` with the reason, never raised.
    """
    default = (resolutions,) if isinstance(resolutions, int) else tuple(dict.fromkeys(resolutions))
    if not default:
        raise ValueError("plan_buckets: no resolution given")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    for resolution in default:
        _check(resolution, step, min_side, max_ratio)
    plan = BucketPlan(default, step, max_upscale, batch_size)
    used = set(default)
    for index, item in enumerate(items):
        path = Path(item.image_path)
        own = tuple(getattr(item, "resolutions", None) or ())
        wanted = own or default
        try:
            size = sizes[path] if sizes is not None and path in sizes else read_size(path)
        except UserError as exc:
            plan.skipped.append(SkippedImage(path, None, str(exc)))
            continue
        for resolution in wanted:
            used.add(resolution)
            bucket = assign_bucket(size, resolution, step, max_upscale, min_side=min_side, max_ratio=max_ratio)
            if bucket is None:
                plan.skipped.append(SkippedImage(path, resolution, _too_small(size, resolution, step, max_upscale,
                                                                              min_side, max_ratio)))
                continue
            plan.placements.append(Placement(index, path, resolution, bucket, item.repeats, size,
                                             upscale_needed(size, bucket), crop_share(size, bucket)))
    plan.resolutions = tuple(sorted(used, reverse=True))
    return plan


def _too_small(size: Size, resolution: int, step: int, max_upscale: float, min_side: int, max_ratio: float) -> str:
    lowest = max(step, math.ceil(min(min_side, resolution) / step) * step)
    bucket = closest_bucket(size, _bucket_sizes(lowest, step, min_side, float(max_ratio)))
    return (f"{size[0]}x{size[1]} is too small: even the smallest bucket for it, {bucket[0]}x{bucket[1]}, "
            f"would enlarge it {upscale_needed(size, bucket):.2f}x (max_upscale {max_upscale:g})")
