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
from trainer.preflight import model_identity
from trainer.spec import JobSpec

_PROGRESS_EVERY = 10


def stack_references(references: list[torch.Tensor | None], indices: list[int]) -> torch.Tensor | None:
    """The reference latents of a batch (B, C, h, w), or None when its items have none (batches never mix)."""
    chosen = [references[i] for i in indices] if references else []
    if not chosen or any(reference is None for reference in chosen):
        return None
    return torch.cat(chosen)


class InputCaches:
    """What the transformer trains on, computed once: embeddings per caption, latents and masks per item."""

    def __init__(self, spec: JobSpec, ops: Any, flavour: Any, emit: Callable[[Event], None],
                 should_stop: Callable[[], bool], output_dir: Path) -> None:
        self.spec, self.ops, self.flavour, self.emit, self.should_stop = spec, ops, flavour, emit, should_stop
        folder = Path(spec.data.cache_dir) if spec.data.cache_dir else Path(output_dir) / "cache"
        self.folder = folder  # the block cache of lowvram.swap_from = "disk" lives here too (blocks/)
        self.text_disk = DiskCache(folder / "text") if spec.data.cache_text_embeddings == "disk" else None
        self.latent_disk = DiskCache(folder / "latents") if spec.data.cache_latents == "disk" else None
        # edit pairs' references beside them, counted apart so the summary says what was reused
        self.reference_disk = DiskCache(folder / "references") if spec.data.cache_latents == "disk" else None
        self.text = TextEmbeddingCache()
        self.latents: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self.references: list[torch.Tensor | None] = []  # edit pairs: the reference's latents, per item

    # ------------------------------------------------------------------ text

    def _text_key(self, caption: str) -> str:
        model = self.spec.model
        encoders = [model_identity(self.spec, slot) for slot in ("text_encoder", "text_encoder_2")]
        return cache_key(kind="text", source=encoders, family=model.family, flavour=model.flavour,
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
        return cache_key(kind="latents", image=file_hash(item.image_path), source=model_identity(self.spec, "vae"),
                         family=model.family, flavour=model.flavour, precision=model.base_precision,
                         size=item.size, crop=item.crop, crop_seed=seed, vae_tiling=self.spec.data.vae_tiling)

    def _reference_key(self, item: TrainItem) -> str:
        """Like a target's key, for the reference file at its bucket; a random crop is the target's (same generator),
        so the target's path and resolution are part of what the cut depends on."""
        model = self.spec.model
        crop_of = (str(item.image_path), item.resolution, self.spec.train.seed) if item.crop == "random" else None
        return cache_key(kind="reference", image=file_hash(item.reference_path),
                         source=model_identity(self.spec, "vae"),
                         family=model.family, flavour=model.flavour, precision=model.base_precision,
                         size=item.reference_bucket, crop=item.crop, crop_of=crop_of,
                         vae_tiling=self.spec.data.vae_tiling)

    def _encoded(self, pipe: Any, disk: DiskCache | None, key: Callable[[TrainItem], str], path: Path,
                 size: tuple[int, int], item: TrainItem) -> torch.Tensor:
        """Latents of `path` cut to `size` with the item's crop, from the disk cache when there, else encoded."""
        stored = disk.get(key(item)) if disk is not None else None
        if stored is not None:
            return stored["latents"]
        pixels = load_pixels(path, size[0], size[1], item.crop, self._crop_rng(item)).unsqueeze(0)
        latents = self.ops.encode_images(pipe, pixels).to("cpu", torch.float32)
        if disk is not None:
            disk.put(key(item), {"latents": latents})  # atomic: a torn write is never read back
        return latents

    def fill_latents(self, pipe: Any, items: list[TrainItem]) -> None:
        self.emit(PhaseChanged(phase="caching latents", detail=f"{len(items)} images"))
        for index, item in enumerate(items):
            if self.should_stop():
                raise UserError("stopped while caching latents; nothing was trained")
            width, height = item.size
            latents = self._encoded(pipe, self.latent_disk, self._latent_key, item.image_path,
                                    item.size, item)
            self.latents.append(latents)
            reference = None
            if item.reference_path is not None and item.reference_bucket is not None:
                # strict pairs: the crop generator in the target's state cuts the reference along the same lines
                reference = self._encoded(pipe, self.reference_disk, self._reference_key,
                                          item.reference_path, item.reference_bucket, item)
            self.references.append(reference)
            mask = None
            if item.mask_path:  # cut exactly like its image: the same crop generator
                mask = load_mask(item.mask_path, width, height, tuple(latents.shape[-2:]), item.crop,
                                 self._crop_rng(item))
            self.masks.append(mask)
            if (index + 1) % _PROGRESS_EVERY == 0:
                self.emit(PhaseChanged(phase="caching latents", detail=f"{index + 1}/{len(items)} images"))

    def summary(self) -> str:
        parts = []
        for name, disk in (("text", self.text_disk), ("latents", self.latent_disk),
                           ("references", self.reference_disk)):
            if disk is not None and (name != "references" or disk.hits + disk.misses):
                parts.append(f"{name}: {disk.hits} reused, {disk.misses} computed")
        return "; ".join(parts) or "caches in memory only"
