"""`sample.clip_score_model`: how well the samples match their prompts, by a CLIP model (transformers).

The score is CLIPScore: 100 x the cosine of the image and text embeddings, floored at 0, averaged over the
samples of one validation. The model loads after sampling (on the training device), scores, and is freed, so it
never sits beside the transformer during training.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch

from trainer.errors import UserError


def _load(source: str, device: torch.device) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(source).to(device).eval()
        processor = CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"sample.clip_score_model: cannot load a CLIP model from '{source}' ({exc}); give a hub id "
                        "such as openai/clip-vit-base-patch32 or a folder saved by transformers, or clear the "
                        "setting") from None
    return model, processor


def clip_scores(source: str, images: Sequence[Any], prompts: Sequence[str], device: torch.device) -> list[float]:
    """CLIPScore of each (PIL image, prompt) pair; the model is freed before this returns."""
    model, processor = _load(source, device)
    try:
        inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                           truncation=True)
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in inputs.items()})
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (100.0 * (image * text).sum(-1)).clamp_min(0.0).tolist()
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
