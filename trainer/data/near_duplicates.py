"""Likely duplicates: the same picture saved again (a JPEG of a PNG, a resized or re-compressed copy), whose bytes
differ so the exact (sha256) check misses it.

Each image gets a fingerprint from the small decode the health check makes anyway: a difference hash (64 bits: is
each pixel of a 9x8 grey thumbnail brighter than its right neighbour) and a 16x16 colour thumbnail. Two images are
likely duplicates when their hashes differ in at most 3 bits and their thumbnails by at most 1.5 % on average: the
hash survives re-encoding, the colours keep two drawings of one shape in different colours apart. Candidates are
found through the hash's four 16-bit bands (two hashes within 3 bits share a band), not by comparing every pair.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

_HASH_BITS = 3  # at most this many differing bits of 64
# Mean absolute difference of the thumbnails, as a share of 255: a JPEG (quality 60-85) or a smaller copy of a demo
# image differs by 0.04-0.7 %, the closest two distinct demo pictures (one shape in two colours) by 2.1 %.
_COLOUR_TOLERANCE = 0.015
_THUMB = (16, 16)


@dataclass(frozen=True)
class Fingerprint:
    dhash: int
    thumbnail: bytes  # 16x16 RGB


def fingerprint(image: Image.Image) -> Fingerprint:
    """The fingerprint of a decoded (RGB, upright) image."""
    factor = min(image.size) // 64
    if factor > 1:  # a whole-number box reduction first: resizing a photo-sized image straight down costs more
        image = image.reduce(factor)
    grey = list(image.convert("L").resize((9, 8), Image.Resampling.BOX).getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = bits << 1 | (grey[row * 9 + col] > grey[row * 9 + col + 1])
    return Fingerprint(bits, image.convert("RGB").resize(_THUMB, Image.Resampling.BOX).tobytes())


def _alike(a: Fingerprint, b: Fingerprint) -> bool:
    if (a.dhash ^ b.dhash).bit_count() > _HASH_BITS:
        return False
    difference = sum(abs(x - y) for x, y in zip(a.thumbnail, b.thumbnail, strict=True))
    return difference <= _COLOUR_TOLERANCE * 255 * len(a.thumbnail)


def likely_duplicates(images: list[tuple[Path, Fingerprint]]) -> list[tuple[Path, Path]]:
    """(image, the earlier image it looks like) for each image that looks like one listed before it."""
    bands: dict[tuple[int, int], list[int]] = defaultdict(list)
    found: list[tuple[Path, Path]] = []
    for index, (path, print_) in enumerate(images):
        keys = [(band, print_.dhash >> (16 * band) & 0xFFFF) for band in range(4)]
        candidates = sorted({earlier for key in keys for earlier in bands[key]})
        match = next((images[earlier][0] for earlier in candidates if _alike(images[earlier][1], print_)), None)
        if match is not None:
            found.append((path, match))
        for key in keys:
            bands[key].append(index)
    return found
