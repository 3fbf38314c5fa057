"""LoRA files: written atomically in the diffusers/PEFT format that `load_lora_weights` reads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

LORA_WEIGHT_SUFFIX = ".safetensors"


def lora_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """The trained adapter's tensors, keyed as PEFT names them inside the transformer (no prefix)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}


def lora_metadata(transformer: Any) -> dict[str, Any]:
    """The adapter config stored beside the weights, so loaders use our alpha rather than guess it from the rank."""
    config = transformer.peft_config["default"].to_dict()
    return {key: (sorted(value) if isinstance(value, set) else value) for key, value in config.items()}


def save_lora_diffusers(transformer: Any, pipeline_class: type, path: Path) -> Path:
    """Write `path` (a .safetensors file) with `transformer.`-prefixed keys via the pipeline's own saver."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=path.parent))
    try:
        pipeline_class.save_lora_weights(
            save_directory=staging,
            transformer_lora_layers=lora_state_dict(transformer),
            weight_name=path.name,
            transformer_lora_adapter_metadata=lora_metadata(transformer),
        )
        written = staging / path.name
        with open(written, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(written, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
