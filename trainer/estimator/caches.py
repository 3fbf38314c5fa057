"""RAM of the cached inputs: the session holds every image's latents and every caption's text embedding in memory
from caching on (trainer/data/cache.py), whatever the disk cache also keeps; both grow with the dataset."""

from __future__ import annotations

from pathlib import Path

from trainer import registry
from trainer.data.datasets import list_images
from trainer.estimator.shapes import text_tokens
from trainer.spec import JobSpec

# The caches' own RAM beside what they hold (dicts, keys, the allocator's share), and what a small dataset's
# latents and embeddings needed before they were counted: measured by bench/rehearse.py on klein base 9B,
# caching latents 0.84 GiB with 4 images and 2 captions against 0.78 predicted with this alone.
CACHES_RAM_GIB = 0.1
LATENT_ELEM = 4  # latents are cached in fp32 (trainer/data/caching.py)


def dataset_images(spec: JobSpec) -> int | None:
    """Images in the job's dataset folders (an edit pair's reference counts as one more); None when no folder
    is on disk yet (a preset, a job being written): the estimate then assumes a small dataset."""
    counted, total = False, 0
    for entry in spec.data.datasets:
        folder = Path(entry.path)
        if folder.is_dir():
            counted = True
            total += len(list_images(folder)) * (2 if entry.conditioning else 1)
    return total if counted else None


def cached_inputs_bytes(spec: JobSpec, f: registry.Flavour, compute_elem: int, images: int | None) -> float:
    """Bytes of the cached latents and embeddings of `images` (`dataset_images`): each image's latents at the job's
    largest resolution, each caption's embedding (one per image, "" and the sample prompts), over CACHES_RAM_GIB.
    Without the dataset on disk (None), a full text-encoder batch of images (registry.TEXT_ENCODE_BATCH)."""
    if f.is_demo:
        return CACHES_RAM_GIB * 1024**3
    images = registry.TEXT_ENCODE_BATCH if images is None else images
    resolution = max(spec.data.every_resolution())
    latent = f.latent_channels * (resolution // 8) ** 2 * LATENT_ELEM
    captions = images + 1 + len(spec.sample.prompts)
    embedding = text_tokens(f) * f.joint_attention_dim * compute_elem
    return CACHES_RAM_GIB * 1024**3 + images * latent + captions * embedding
