"""Aspect-ratio buckets: sizes, which bucket an image takes, and the plan a user reads before training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.buckets import assign_bucket, bucket_sizes, crop_share, plan_buckets, upscale_needed


@dataclass(frozen=True)
class Item:
    image_path: Path
    repeats: int = 1


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024, 1536])
@pytest.mark.parametrize("step", [16, 32, 64])
def test_bucket_sizes_keep_the_area_fit_the_latent_grid_and_come_in_both_orientations(resolution: int,
                                                                                       step: int) -> None:
    sizes = bucket_sizes(resolution, step)
    area = resolution * resolution
    assert (resolution, resolution) in sizes
    for width, height in sizes:
        assert width % step == 0 and height % step == 0 and width % 16 == 0
        assert 0.9 * area <= width * height <= area  # never more memory than the square
        assert max(width, height) / min(width, height) <= 4.0
        assert min(width, height) >= min(256, resolution)
        assert (height, width) in sizes
    assert len(sizes) == len(set(sizes))


def test_the_1024_buckets_are_the_familiar_ones() -> None:
    sizes = bucket_sizes(1024)
    for size in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (2048, 512)]:
        assert size in sizes
    assert max(w / h for w, h in sizes) == 4.0
    assert all(w / h <= 2 for w, h in bucket_sizes(1024, max_ratio=2.0))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resolution": 1024, "step": 24}, "multiple of 16"),
    ({"resolution": 1000, "step": 64}, "multiple of the bucket step"),
    ({"resolution": 1024, "step": 64, "max_ratio": 0.5}, "max_ratio"),
])
def test_bad_bucket_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bucket_sizes(**kwargs)
    with pytest.raises(ValueError, match=message):
        assign_bucket((2000, 2000), **kwargs)


def test_an_image_takes_the_bucket_with_the_closest_aspect_ratio() -> None:
    sizes = bucket_sizes(1024)
    for width, height in sizes:  # an image twice a bucket's size takes exactly that bucket
        assert assign_bucket((2 * width, 2 * height), 1024) == (width, height)
    for image in [(3000, 2000), (2000, 3000), (4000, 1000), (1999, 2001), (5000, 500)]:
        chosen = assign_bucket(image, 1024)
        best = min(abs(math.log(image[0] / image[1]) - math.log(w / h)) for w, h in sizes)
        assert chosen is not None
        assert abs(math.log(image[0] / image[1]) - math.log(chosen[0] / chosen[1])) == pytest.approx(best)


@pytest.mark.parametrize("max_upscale", [1.0, 1.25, 2.0])
def test_no_image_is_enlarged_past_the_limit(max_upscale: float) -> None:
    for width in range(100, 2200, 150):
        for height in range(100, 2200, 190):
            bucket = assign_bucket((width, height), 1024, 64, max_upscale)
            if bucket is None:
                assert min(width, height) * max_upscale < 256  # only images below the smallest tier
            else:
                assert upscale_needed((width, height), bucket) <= max_upscale + 1e-9


def test_a_small_image_goes_down_a_tier_instead_of_being_blown_up() -> None:
    assert assign_bucket((700, 700), 1024, 64, 1.0) == (640, 640)
    assert assign_bucket((700, 700), 1024, 64, 1.5) == (1024, 1024)
    assert assign_bucket((1000, 700), 1024, 64, 1.0) == (896, 640)
    assert assign_bucket((100, 80), 1024, 64, 1.0) is None
    assert assign_bucket((200, 200), 1024, 64, 1.0) is None
    assert assign_bucket((200, 200), 1024, 64, 1.28) == (256, 256)  # the lowest tier, enlarged 1.28x
    assert assign_bucket((200, 200), 1024, 64, 1.27) is None
    assert assign_bucket((64, 64), 64, 16, 1.0) == (64, 64)  # the demo's images and resolution


def test_crop_share() -> None:
    assert crop_share((1000, 1000), (1024, 1024)) == pytest.approx(0)
    assert crop_share((2000, 1000), (1024, 1024)) == pytest.approx(0.5)


def test_the_plan_counts_buckets_per_resolution_and_lists_what_it_skips(tmp_path: Path) -> None:
    sizes = {
        tmp_path / "square.png": (2048, 2048),
        tmp_path / "square2.png": (1500, 1500),
        tmp_path / "land.png": (2304, 1792),
        tmp_path / "tall.png": (1792, 2304),
        tmp_path / "small.png": (700, 700),
        tmp_path / "tiny.png": (120, 90),
    }
    items = [Item(path, repeats=3 if path.stem == "square" else 1) for path in sizes]
    plan = plan_buckets(items, [1024, 512], sizes=sizes, step=64, max_upscale=1.0, batch_size=2)

    at_1024 = plan.counts(1024)
    assert at_1024[(1024, 1024)].images == 2 and at_1024[(1024, 1024)].samples == 4
    assert at_1024[(1152, 896)].images == 1 and at_1024[(896, 1152)].images == 1
    assert at_1024[(640, 640)].images == 1  # small.png, a tier down
    assert plan.counts(512)[(512, 512)].images == 3  # small.png fills 512 itself
    assert {(s.image_path.name, s.resolution) for s in plan.skipped} == {("tiny.png", 1024), ("tiny.png", 512)}
    assert len(plan.placements) == 10 and plan.samples == 14
    assert plan.by_bucket()[(1024, 1024)][0].item_index == 0

    report = plan.report()
    assert "resolution 1024: 5 images, 7 with repeats" in report
    assert "resolution 512: 5 images, 7 with repeats" in report
    assert "1152x896" in report and "896x1152" in report and "1:1.29" in report
    assert "smaller tier" in report  # 640x640 at 1024
    assert "fewer than a batch" in report  # 1152x896 holds one sample at batch size 2
    assert "tiny.png at 1024: 120x90 is too small" in report


def test_the_plan_reads_sizes_it_is_not_given_and_skips_unreadable_files(tmp_path: Path) -> None:
    Image.new("RGB", (600, 400)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"no image here")
    items = [Item(tmp_path / "wide.png"), Item(tmp_path / "broken.png")]
    plan = plan_buckets(items, 512, step=64, max_upscale=2.0)
    assert [p.bucket for p in plan.placements] == [(640, 384)]
    assert plan.skipped[0].image_path.name == "broken.png" and "cannot read" in plan.skipped[0].reason


def test_items_with_their_own_resolutions_use_them(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class MultiItem:
        image_path: Path
        repeats: int
        resolutions: tuple[int, ...]

    sizes = {tmp_path / "a.png": (2048, 2048)}
    plan = plan_buckets([MultiItem(tmp_path / "a.png", 1, (768, 512))], [1024], sizes=sizes)
    assert sorted(p.bucket for p in plan.placements) == [(512, 512), (768, 768)]
    assert plan.resolutions == (1024, 768, 512)
