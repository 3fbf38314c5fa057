"""Images as the VAE sees them: upright, 8-bit RGB whatever the file, cut to the bucket's size."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.data.images import crop_box, load_mask, load_pixels, open_image, read_size, to_rgb, verify_image
from trainer.errors import UserError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def _halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _png16(width: int, height: int, colour_type: int, pixel: bytes) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes no 16-bit RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + pixel * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("scale", [1, 20])  # 20: big enough to decode at reduced scale
def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path, scale: int) -> None:
    # Stored landscape, red left / blue right, tagged "rotate 90° clockwise to view" (orientation 6):
    # upright it is portrait with red on top.
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves((80 * scale, 40 * scale), RED, BLUE).save(path, quality=95, exif=exif.tobytes())

    image = open_image(path)
    assert image.size == (40 * scale, 80 * scale) and read_size(path) == verify_image(path) == image.size
    assert _near(image.getpixel((20 * scale, 10 * scale)), RED, 20)
    assert _near(image.getpixel((20 * scale, 70 * scale)), BLUE, 20)
    pixels = load_pixels(path, 16, 32)
    assert pixels.shape == (3, 32, 16)
    assert pixels[0, 4, 8] > 0.8 and pixels[2, 4, 8] < -0.8  # red on top
    assert pixels[2, 28, 8] > 0.8 and pixels[0, 28, 8] < -0.8  # blue below


@pytest.mark.parametrize(("name", "make", "expected"), [
    ("grey.png", lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
    ("grey_alpha.png", lambda: Image.new("LA", (8, 8), (0, 0)), WHITE),
    ("grey16.png", lambda: Image.new("I;16", (8, 8), 32896), (128, 128, 128)),
    ("rgba_clear.png", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), WHITE),
    ("rgba_half.png", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
    ("rgba_solid.png", lambda: Image.new("RGBA", (8, 8), (10, 200, 30, 255)), (10, 200, 30)),
    ("cmyk.jpg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), RED),
    ("lossless.webp", lambda: Image.new("RGB", (8, 8), (10, 200, 30)), (10, 200, 30)),
    ("alpha.webp", lambda: Image.new("RGBA", (8, 8), (10, 200, 30, 0)), WHITE),
    ("plain.bmp", lambda: Image.new("RGB", (8, 8), (10, 200, 30)), (10, 200, 30)),
    ("bilevel.png", lambda: Image.new("1", (8, 8), 1), WHITE),
])
def test_every_mode_loads_as_rgb_with_its_colour(tmp_path: Path, name: str, make, expected) -> None:
    path = tmp_path / name
    image = make()
    options = {"lossless": True} if name.endswith(".webp") else {"quality": 95} if name.endswith(".jpg") else {}
    image.save(path, **options)
    loaded = open_image(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)
    assert _near(loaded.getpixel((4, 4)), expected), loaded.getpixel((4, 4))


def test_palette_with_a_transparent_index_lands_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 20, 20] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    loaded = open_image(path)
    assert loaded.getpixel((1, 1)) == WHITE and loaded.getpixel((6, 6)) == (200, 20, 20)


@pytest.mark.parametrize(("colour_type", "pixel", "expected"), [
    (2, struct.pack(">HHH", 65535, 32896, 0), (255, 128, 0)),  # RGB, 48 bits
    (6, struct.pack(">HHHH", 0, 0, 65535, 0), WHITE),  # RGBA, 64 bits, transparent
    (0, struct.pack(">H", 16448), (64, 64, 64)),  # grey, 16 bits
])
def test_sixteen_bit_png_scales_to_eight_bits(tmp_path: Path, colour_type: int, pixel: bytes, expected) -> None:
    path = tmp_path / "deep.png"
    path.write_bytes(_png16(6, 4, colour_type, pixel))
    assert open_image(path).getpixel((2, 2)) == expected


def test_wide_integer_modes_scale_rather_than_clip() -> None:
    assert to_rgb(Image.new("I", (2, 2), 40000)).getpixel((0, 0)) == (156, 156, 156)
    assert to_rgb(Image.new("I", (2, 2), 200)).getpixel((0, 0)) == (200, 200, 200)  # already 8-bit values


def test_a_broken_colour_profile_falls_back_to_plain_conversion(tmp_path: Path) -> None:
    path = tmp_path / "odd_profile.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, icc_profile=b"not a profile")
    assert open_image(path).getpixel((4, 4)) == (200, 10, 10)


def test_truncated_or_garbage_files_raise_a_user_error_naming_them(tmp_path: Path) -> None:
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (96, 96), bytes(rng.randrange(256) for _ in range(96 * 96 * 3)))
    whole = tmp_path / "whole.jpg"
    noise.save(whole, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for loader in (open_image, verify_image, lambda p: load_pixels(p, 32)):
        with pytest.raises(UserError, match="cut.jpg"):
            loader(cut)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UserError, match="notes.png.*cannot read"):
        open_image(text)


def _stripes(path: Path, size: tuple[int, int] = (160, 40)) -> Path:
    """Columns whose red value rises left to right: any horizontal shift of a crop changes the pixels."""
    image = Image.new("RGB", size)
    image.putdata([(255 * x // (size[0] - 1), 0, 0) for _y in range(size[1]) for x in range(size[0])])
    image.save(path)
    return path


def test_centre_crop_covers_the_target_and_keeps_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    image = Image.new("RGB", (120, 40), RED)
    image.paste(GREEN, (40, 0, 80, 40))
    image.paste(BLUE, (80, 0, 120, 40))
    image.save(path)
    pixels = load_pixels(path, 32, 32)
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert (pixels[1] > 0.9).all() and (pixels[0] < -0.9).all()  # only the green third is left
    portrait = load_pixels(path, 48, 64)  # taller than the image: scaled up to cover, cut at the sides
    assert portrait.shape == (3, 64, 48)
    assert crop_box((120, 40), 32, 32) == pytest.approx((1 / 3, 0.0, 2 / 3, 1.0))


def test_random_crop_is_reproducible_and_differs_from_the_centre(tmp_path: Path) -> None:
    path = _stripes(tmp_path / "stripes.png")
    first = load_pixels(path, 32, 32, crop="random", rng=random.Random(7))
    again = load_pixels(path, 32, 32, crop="random", rng=random.Random(7))
    other = load_pixels(path, 32, 32, crop="random", rng=random.Random(8))
    centre = load_pixels(path, 32, 32)
    assert torch.equal(first, again)
    assert not torch.allclose(first, centre, atol=0.05) and not torch.allclose(first, other, atol=0.05)
    with pytest.raises(ValueError, match="crop"):
        load_pixels(path, 32, crop="middle")  # type: ignore[arg-type]


def test_a_mask_is_cut_like_its_image(tmp_path: Path) -> None:
    path = _stripes(tmp_path / "stripes.png")
    for seed in (1, 2, 3):
        pixels = load_pixels(path, 32, 32, crop="random", rng=random.Random(seed))
        mask = load_mask(path, 32, 32, (16, 16), crop="random", rng=random.Random(seed))
        assert mask.shape == (1, 1, 16, 16)
        red = (pixels[0] + 1) / 2  # the mask file is the image itself, read as grey: compare the red ramp
        expected = torch.nn.functional.avg_pool2d(red[None, None], 2)
        grey_of_red = 0.299  # the L conversion weights red by 0.299
        assert torch.allclose(mask, expected * grey_of_red, atol=0.02)
    legacy = load_mask(path, 32, (8, 8))  # load_mask(path, resolution, latent_size), the old form
    assert torch.allclose(legacy, load_mask(path, 32, 32, (8, 8)))


def test_a_big_jpeg_decoded_at_reduced_scale_matches_a_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    gradient = Image.linear_gradient("L").resize((1200, 900)).convert("RGB")
    gradient.save(path, quality=95)
    fast = load_pixels(path, 64, 48)
    full = open_image(path).resize((64, 48), Image.Resampling.LANCZOS)
    reference = torch.tensor(list(full.getdata()), dtype=torch.float32).view(48, 64, 3).permute(2, 0, 1)
    assert (fast - (reference / 127.5 - 1)).abs().mean() < 0.02
