"""Turning an image file into the pixel tensor the VAE encodes (and a mask into its loss weights).

One decoding path (`_decode`) serves the health check (`verify_image`), `open_image` and `load_pixels`, so
a file the health check passed decodes the same way when the latents are cached. torch is imported inside
the functions that return tensors; the rest is safe for torch-free callers (health check, bucket planner).
"""

from __future__ import annotations

import functools
import io
import random
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from trainer.errors import UserError

if TYPE_CHECKING:
    import torch

Crop = Literal["center", "random"]
# A region of an image as fractions of its width and height: (left, top, right, bottom), each in [0, 1].
# Fractions, not pixels, so that an image decoded at reduced size (JPEG draft) and its mask, whatever its own
# size, are cut along the same lines.
CropBox = tuple[float, float, float, float]

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(path: Path | str, exc: BaseException, what: str = "image") -> UserError:
    if isinstance(exc, UnidentifiedImageError):
        detail = "not an image file Pillow recognises"  # its own message names a BytesIO
    else:
        detail = str(exc) or type(exc).__name__
    return UserError(f"{path}: cannot read this {what} ({detail}); remove or replace the file")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (*_READ_ERRORS, KeyError, TypeError):
        return 1  # broken EXIF: take the pixels as stored rather than refuse the photo


def _upright(image: Image.Image) -> Image.Image:
    """The loaded image turned upright by its EXIF orientation, in place (no copy of a big photo)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (*_READ_ERRORS, KeyError, TypeError):
        pass  # broken EXIF: keep the pixels as stored
    return image


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) as the picture is seen, EXIF orientation applied, from the header alone (no decoding)."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            swapped = _orientation(opened) in _SWAPS_SIDES
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    return (height, width) if swapped else (width, height)


def _sixteen_bit_to_eight(image: Image.Image) -> Image.Image:
    """Grey 16-bit (or 32-bit integer) to 8-bit "L" by scaling; Pillow's own convert clips everything above 255."""
    wide = image.convert("I") if image.mode != "I" else image
    if image.mode == "I" and (wide.getextrema()[1] or 0) <= 255:
        return wide.convert("L")  # already 0..255 values held in a wide mode
    return wide.point(lambda value: value * (1 / 257) + 0.5).convert("L")


def _has_alpha(image: Image.Image) -> bool:
    if image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA":
        return True
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    try:
        description = ImageCms.getProfileDescription(profile)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return False
    return "srgb" in description.lower().replace(" ", "")


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(image: Image.Image) -> Image.Image | None:
    """RGB through the embedded ICC profile (Display P3, Adobe RGB, a CMYK press profile); None when there is none,
    it is sRGB already, or it cannot be used."""
    icc = image.info.get("icc_profile")
    if not icc:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if image.mode == "RGB" and _is_srgb(source):
            return None
        return ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # a broken profile: plain conversion below is close enough


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow opens.

    Transparent pixels are composited on white. The VAE sees no alpha, and dropping the channel exposes
    whatever colour the editor left under transparent pixels (often black, or the cut-out's old background),
    which the LoRA would learn as part of the subject. White is what most viewers show behind a cut-out and
    what product shots use; flatten the images yourself to train on another background.
    """
    if image.mode in _SIXTEEN_BIT_GREY or image.mode == "I":
        image = _sixteen_bit_to_eight(image)
    elif image.mode == "F":
        image = image.convert("L")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("RGB", "CMYK"):
        converted = _to_srgb(image)
        if converted is not None:
            return converted
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_upright(path: Path, data: bytes | None = None, cover: tuple[int, int] | None = None,
                  what: str = "image") -> tuple[Image.Image, tuple[int, int]]:
    """The fully decoded image, upright by EXIF, in its own mode; and the upright size of the stored picture.

    With `cover` (width, height), a JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers it: the
    whole file is decoded all the same, so truncation is found, at a fraction of the time for big photos.
    """
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as opened:
            width, height = opened.size
            swapped = _orientation(opened) in _SWAPS_SIDES
            if cover is not None and opened.format == "JPEG":
                upright_w, upright_h = (height, width) if swapped else (width, height)
                scale = max(cover[0] / upright_w, cover[1] / upright_h)
                if scale < 0.5:  # a reduction of 2 or more would still cover
                    needed = (int(width * scale) + 1, int(height * scale) + 1)
                    opened.draft(None, needed)
            opened.load()
            image = _upright(opened)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc, what) from None
    return image, ((height, width) if swapped else (width, height))


def _decode(path: Path, data: bytes | None = None,
            cover: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`_open_upright` then `to_rgb`: the one decoding path of every training image."""
    image, size = _open_upright(path, data, cover)
    try:
        return to_rgb(image), size
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def verify_image(path: Path, data: bytes | None = None) -> tuple[int, int]:
    """Decode a training image completely, as training will (JPEGs at reduced scale); its upright (width, height).

    `data`: the file's bytes when the caller has read them already. Raises UserError naming the file.
    """
    return decode_small(path, data)[1]


def decode_small(path: Path, data: bytes | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`verify_image`'s decode: the RGB upright image (JPEGs at a reduced scale of at least 64 px) and its upright
    size."""
    return _decode(Path(path), data, cover=(64, 64))


def verify_mask(path: Path) -> tuple[int, int]:
    """Decode a mask image completely; its upright (width, height). Raises UserError naming the file."""
    return _open_upright(Path(path), what="mask image")[1]


def open_image(path: Path) -> Image.Image:
    """The image as 8-bit RGB, upright by its EXIF orientation (see `to_rgb` for modes and transparency).

    Raises UserError naming the file when it cannot be read or is truncated (it is decoded completely here).
    """
    return _decode(Path(path))[0]


def crop_box(size: tuple[int, int], width: int, height: int, crop: Crop = "center",
             rng: random.Random | None = None) -> CropBox:
    """The region of an image of `size` that, scaled to cover (width, height), becomes the (width, height) result.

    "random" draws exactly two numbers from `rng` (an unseeded generator when None) whatever the sizes, so a
    mask loaded with a generator in the same state is cut along the same lines as its image.
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop: '{crop}' is not one of center, random")
    source_width, source_height = size
    scale = max(width / source_width, height / source_height)  # the image covers the target, then is cut
    keep_x, keep_y = width / scale / source_width, height / scale / source_height  # fractions kept
    if crop == "random":
        rng = rng if rng is not None else random.Random()
        at_x, at_y = rng.random(), rng.random()
    else:
        at_x = at_y = 0.5
    left, top = at_x * (1 - keep_x), at_y * (1 - keep_y)
    return (left, top, left + keep_x, top + keep_y)


def _cut(image: Image.Image, box: CropBox, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    w, h = image.size
    region = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    # reducing_gap: box-average down by whole factors first, then resample; indistinguishable at 3, much faster.
    return image.resize(size, resample, box=region, reducing_gap=3.0)


def load_pixels(path: Path, width: int, height: int | None = None, crop: Crop = "center",
                rng: random.Random | None = None) -> torch.Tensor:
    """RGB pixels in [-1, 1], (3, height, width): resized to cover (width, height), then cut to it.

    `height` defaults to `width` (a square). crop "center" keeps the middle; "random" draws the offset from
    `rng` (see `crop_box`).
    """
    import torch

    height = width if height is None else height
    path = Path(path)
    image, upright_size = _decode(path, cover=(width, height))
    box = crop_box(upright_size, width, height, crop, rng)
    image = _cut(image, box, (width, height), Image.Resampling.LANCZOS)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(height, width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """Inverse of load_pixels for one image (3, H, W) in [-1, 1]."""
    import torch

    data = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(data.numpy())


def load_mask(path: Path, width: int, height: int | tuple[int, int], latent_size: tuple[int, int] | None = None,
              crop: Crop = "center", rng: random.Random | None = None) -> torch.Tensor:
    """A loss mask (1, 1, h, w) in [0, 1] on the latent grid `latent_size` (h, w): cut like its image, area-averaged.

    Pass the image's (width, height), crop and an rng in the same state as for its `load_pixels` call.
    The old form `load_mask(path, resolution, latent_size)` still works until its callers are updated.
    """
    import torch

    if isinstance(height, tuple):  # legacy: load_mask(path, resolution, latent_size)
        height, latent_size = width, height
    if latent_size is None:
        raise TypeError("load_mask: latent_size (h, w) is required")
    path = Path(path)
    mask, _ = _open_upright(path, what="mask image")
    if mask.mode in _SIXTEEN_BIT_GREY or mask.mode == "I":
        mask = _sixteen_bit_to_eight(mask)
    mask = mask.convert("L")
    box = crop_box(mask.size, width, height, crop, rng)
    mask = _cut(mask, box, (latent_size[1], latent_size[0]), Image.Resampling.BOX)
    data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).float() / 255.0
    return data.view(1, 1, *latent_size)
