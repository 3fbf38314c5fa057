"""Filling the session's caches: text embeddings and latents from disk when warm, computed and stored when not."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.data.cache import TextEmbeddingCache
from trainer.data.datasets import TrainItem
from trainer.data.disk_cache import DiskCache, cache_key, file_hash
from trainer.data.images import load_mask, load_pixels
from trainer.errors import UserError
from trainer.events import Event, PhaseChanged
from trainer.preflight import model_source
from trainer.spec import JobSpec

_PROGRESS_EVERY = 10


class InputCaches:
    """What the transformer trains on, computed once: embeddings per caption, latents and masks per item."""

    def __init__(self, spec: JobSpec, ops: Any, flavour: Any, emit: Callable[[Event], None],
                 should_stop: Callable[[], bool], output_dir: Path) -> None:
        self.spec, self.ops, self.flavour, self.emit, self.should_stop = spec, ops, flavour, emit, should_stop
        folder = Path(spec.data.cache_dir) if spec.data.cache_dir else Path(output_dir) / "cache"
        self.text_disk = DiskCache(folder / "text") if spec.data.cache_text_embeddings == "disk" else None
        self.latent_disk = DiskCache(folder / "latents") if spec.data.cache_latents == "disk" else None
        self.text = TextEmbeddingCache()
        self.latents: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []

    # ------------------------------------------------------------------ text

    def _text_key(self, caption: str) -> str:
        model = self.spec.model
        return cache_key(kind="text", source=model_source(self.spec), family=model.family, flavour=model.flavour,
                         precision=model.text_encoder_precision, caption=caption)

    def text_is_warm(self, captions: list[str]) -> bool:
        """Every caption's embedding is on disk: the text encoders need not be loaded at all."""
        return self.text_disk is not None and all(self.text_disk.contains(self._text_key(c)) for c in captions)

    def fill_text(self, pipe: Any, captions: list[str]) -> None:
        unique = list(dict.fromkeys(captions))
        self.emit(PhaseChanged(phase="caching text embeddings", detail=f"{len(unique)} prompts"))
        missing: list[str] = []
        for caption in unique:
            stored = self.text_disk.get(self._text_key(caption)) if self.text_disk else None
            if stored is None:
                missing.append(caption)
            else:
                self.text.fill([caption], lambda _chunk, stored=stored: stored)
        if missing and pipe.text_encoder is None:
            raise UserError("text embeddings went missing from the disk cache while loading; run again")

        def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
            if self.should_stop():
                raise UserError("stopped while caching text embeddings; nothing was trained")
            encoded = self.ops.encode_prompts(pipe, chunk, self.flavour)
            if self.text_disk is not None:
                for index, caption in enumerate(chunk):
                    self.text_disk.put(self._text_key(caption), {k: v[index:index + 1] for k, v in encoded.items()})
            return encoded

        self.text.fill(missing, encode)

    # ------------------------------------------------------------------ latents

    def _crop_rng(self, item: TrainItem) -> random.Random:
        """The random crop of an image at a resolution, the same on every run (crc32, not Python's hash)."""
        return random.Random(zlib.crc32(f"{self.spec.train.seed}:{item.image_path}:{item.resolution}".encode()))

    def _latent_key(self, item: TrainItem) -> str:
        model = self.spec.model
        seed = self.spec.train.seed if item.crop == "random" else None
        return cache_key(kind="latents", image=file_hash(item.image_path), source=model_source(self.spec),
                         family=model.family, flavour=model.flavour, precision=model.base_precision,
                         size=item.size, crop=item.crop, crop_seed=seed, vae_tiling=self.spec.data.vae_tiling)

    def fill_latents(self, pipe: Any, items: list[TrainItem]) -> None:
        self.emit(PhaseChanged(phase="caching latents", detail=f"{len(items)} images"))
        for index, item in enumerate(items):
            if self.should_stop():
                raise UserError("stopped while caching latents; nothing was trained")
            key = self._latent_key(item) if self.latent_disk else ""
            stored = self.latent_disk.get(key) if self.latent_disk else None
            width, height = item.size
            if stored is not None:
                latents = stored["latents"]
            else:
                pixels = load_pixels(item.image_path, width, height, item.crop, self._crop_rng(item)).unsqueeze(0)
                latents = self.ops.encode_images(pipe, pixels).to("cpu", torch.float32)
                if self.latent_disk is not None:
                    self.latent_disk.put(key, {"latents": latents})
            self.latents.append(latents)
            mask = None
            if item.mask_path:  # cut exactly like its image: the same crop generator
                mask = load_mask(item.mask_path, width, height, tuple(latents.shape[-2:]), item.crop,
                                 self._crop_rng(item))
            self.masks.append(mask)
            if (index + 1) % _PROGRESS_EVERY == 0:
                self.emit(PhaseChanged(phase="caching latents", detail=f"{index + 1}/{len(items)} images"))

    def summary(self) -> str:
        parts = []
        for name, disk in (("text", self.text_disk), ("latents", self.latent_disk)):
            if disk is not None:
                parts.append(f"{name}: {disk.hits} reused, {disk.misses} computed")
        return "; ".join(parts) or "caches in memory only"
