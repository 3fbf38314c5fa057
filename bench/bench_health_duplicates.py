"""What the likely-duplicate check (a perceptual fingerprint per image) adds to the dataset health check: the
same folder checked with the fingerprint and with it replaced by nothing, best of a few runs each, and the ratio.

    .venv/bin/python bench/bench_health_duplicates.py [--images 60] [--size 1024]

Images are smooth random colour fields (PNG and JPEG, half each), as large as photos are after a resize.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from trainer.data import health  # noqa: E402
from trainer.spec import DatasetEntry  # noqa: E402


def _images(folder: Path, count: int, size: int) -> None:
    rng = random.Random(0)
    for index in range(count):
        small = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(8 * 8 * 3)))
        image = small.resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / (f"img_{index:03}.png" if index % 2 else f"img_{index:03}.jpg"))


def _timed(folder: Path) -> float:
    start = time.perf_counter()
    health.check_datasets([DatasetEntry(path=str(folder))], workers=1)
    return time.perf_counter() - start


def _bare(folder: Path) -> float:
    original = health.fingerprint
    health.fingerprint = lambda image: None  # the bare check: decode and hash only
    try:
        return _timed(folder)
    finally:
        health.fingerprint = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _images(folder, args.images, args.size)
        # interleaved, best of each: a busy machine slows both alike
        pairs = [(_timed(folder), _bare(folder)) for _ in range(args.runs)]
        with_print, bare = min(p[0] for p in pairs), min(p[1] for p in pairs)
    per_image = (with_print - bare) / args.images * 1000
    print(f"{args.images} images of {args.size} px, one worker: bare check {bare:.2f} s, with fingerprints "
          f"{with_print:.2f} s, ratio {with_print / bare:.2f} ({per_image:.1f} ms more per image)")


if __name__ == "__main__":
    main()
