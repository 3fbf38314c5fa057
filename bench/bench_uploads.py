"""Dataset uploads (ui/uploads.py) against a bare reference in the same run: a zip of images and captions written
into a dataset folder with every check (names, types by content, limits counted while expanding, staging, no
overwrite) against `zipfile.ZipFile.extractall` of the same zip; and loose files against `shutil.copyfile`.

    .venv/bin/python bench/bench_uploads.py [--images 200] [--mb-per-image 1.0]

Prints seconds and the ratio (checked / bare). Random bytes behind a PNG signature stand in for photos: they do
not compress, as JPEGs do not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.upload_limits import UploadLimits  # noqa: E402
from ui.uploads import save_upload  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def make_files(folder: Path, images: int, size: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for index in range(images):
        image = folder / f"photo {index:04d}.png"
        image.write_bytes(PNG + os.urandom(size - len(PNG)))
        caption = folder / f"photo {index:04d}.txt"
        caption.write_text(f"a photo, number {index}", encoding="utf-8")
        paths += [image, caption]
    return paths


def timed(action) -> float:  # noqa: ANN001
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--mb-per-image", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.mb_per_image * 2**20)
    limits = UploadLimits(max_total_mb=4096, max_files=10_000)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        files = make_files(root / "given", args.images, size)
        archive = root / "set.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
            for path in files:
                handle.write(path, f"set/{path.name}")
        total_mb = sum(path.stat().st_size for path in files) / 2**20
        print(f"{len(files)} files, {total_mb:.0f} MB ({args.images} images with captions)")

        def bare_zip() -> None:
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(root / "bare_zip")

        def bare_copy() -> None:
            (root / "bare_copy").mkdir()
            for path in files:
                shutil.copyfile(path, root / "bare_copy" / path.name)

        rows = [
            ("zip", timed(bare_zip), timed(lambda: save_upload([(archive, "set.zip")], root / "checked_zip", limits))),
            ("files", timed(bare_copy),
             timed(lambda: save_upload([(path, path.name) for path in files], root / "checked_files", limits))),
        ]
        assert len(list((root / "checked_zip").iterdir())) == len(files)
        for what, bare, checked in rows:
            print(f"{what:6s} bare {bare:6.2f} s   checked {checked:6.2f} s   ratio {checked / bare:5.2f}")


if __name__ == "__main__":
    main()
