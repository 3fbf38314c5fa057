"""Turning an image file into the pixel tensor the VAE encodes."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from trainer.errors import UserError


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """RGB pixels in [-1, 1], (3, res, res): EXIF orientation applied, shorter side resized, centre crop."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except OSError as exc:
        raise UserError(f"{path}: cannot read this image ({exc}); remove or replace the file") from None
    image = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(resolution, resolution, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """Inverse of load_pixels for one image (3, H, W) in [-1, 1]."""
    data = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(data.numpy())


def load_mask(path: Path, resolution: int, latent_size: tuple[int, int]) -> torch.Tensor:
    """A loss mask (1, 1, h, w) in [0, 1] on the latent grid: cropped like its image, then area-averaged."""
    try:
        with Image.open(path) as opened:
            mask = ImageOps.exif_transpose(opened).convert("L")
    except OSError as exc:
        raise UserError(f"{path}: cannot read this mask image ({exc}); replace it") from None
    mask = ImageOps.fit(mask, (resolution, resolution), method=Image.Resampling.BOX)
    mask = mask.resize((latent_size[1], latent_size[0]), Image.Resampling.BOX)
    data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).float() / 255.0
    return data.view(1, 1, *latent_size)
