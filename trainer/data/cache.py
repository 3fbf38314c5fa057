"""In-memory caches of text embeddings and latents, computed once before training."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from trainer.registry import TEXT_ENCODE_BATCH


class TextEmbeddingCache:
    """Caption → embeddings (each tensor with a leading batch dimension of 1), stored on the CPU."""

    def __init__(self) -> None:
        self._store: dict[str, dict[str, torch.Tensor]] = {}

    def fill(self, captions: Iterable[str], encode: Callable[[list[str]], dict[str, torch.Tensor]],
             batch_size: int = TEXT_ENCODE_BATCH) -> None:
        missing = list(dict.fromkeys(c for c in captions if c not in self._store))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            encoded = encode(chunk)
            for index, caption in enumerate(chunk):
                self._store[caption] = {k: v[index:index + 1].detach().cpu() for k, v in encoded.items()}

    def __getitem__(self, caption: str) -> dict[str, torch.Tensor]:
        return self._store[caption]

    def batch(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        keys = self._store[captions[0]].keys()
        return {k: torch.cat([self._store[c][k] for c in captions]).to(device) for k in keys}

    def __len__(self) -> int:
        return len(self._store)
