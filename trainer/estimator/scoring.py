"""The CLIP scorer's memory (`sample.clip_score_model`): it loads on the training device after a validation's
samples are rendered, while the transformer's sampling weights are still there, so its weights and its forward
count in the validation-sampling phase. Torch-free; reads only file sizes."""

from __future__ import annotations

from pathlib import Path

# A hub id whose files are not on this machine yet: sized as the usual choice, openai/clip-vit-large-patch14
# (427.6 M parameters stored in fp32; transformers loads them as stored).
UNKNOWN_CLIP_BYTES = 1.71e9
# The no-grad forward of a validation's few 224 px images and prompts: activations of one layer at a time.
CLIP_WORK_BYTES = 64 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def clip_scorer_bytes(source: str) -> float:
    """Bytes on the device while the samples are scored: the CLIP model's weight files as stored, plus its forward;
    0 when no scorer is set."""
    if not source:
        return 0.0
    folder = Path(source).expanduser()
    files = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES] if folder.is_dir() else []
    weights = sum(p.stat().st_size for p in files) if files else UNKNOWN_CLIP_BYTES
    # a folder holding both formats of the same weights loads one of them
    if any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".bin" for p in files):
        weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return weights + CLIP_WORK_BYTES
