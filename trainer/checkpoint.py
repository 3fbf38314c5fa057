"""LoRA files and training states: written atomically; the LoRA in the diffusers/PEFT format.

torch is imported where tensors are handled, so the UI can list saved states without it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.files import write_atomic

LORA_WEIGHT_SUFFIX = ".safetensors"


def save_lora_diffusers(transformer: Any, pipeline_class: type, path: Path) -> Path:
    """Write `path` (a .safetensors file) with `transformer.`-prefixed keys via the pipeline's own saver.

    The adapter config goes in the file's metadata, so loaders use our alpha rather than guess it from the rank.
    """
    from trainer.adapters import adapter_export

    tensors, metadata = adapter_export(transformer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=path.parent))
    try:
        pipeline_class.save_lora_weights(
            save_directory=staging,
            transformer_lora_layers=tensors,
            weight_name=path.name,
            transformer_lora_adapter_metadata=metadata,
        )
        written = staging / path.name
        with open(written, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(written, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# ---------------------------------------------------------------- training state for exact resume

STATE_DIR = "state"
_STATE_PATTERN = re.compile(r"^step(\d{6,})\.pt$")


def state_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / STATE_DIR / f"step{step:06d}.pt"


def save_training_state(path: Path, state: dict[str, Any]) -> Path:
    """Write the state atomically: a crash mid-write leaves the previous state, never a torn file."""
    import torch

    write_atomic(Path(path), lambda tmp: torch.save(state, tmp))
    return Path(path)


def load_training_state(path: Path) -> dict[str, Any]:
    """Tensors, numbers, strings and lists only: loaded with weights_only, so no pickled code ever runs."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is the same problem for the user
        raise UserError(f"{path}: the saved training state cannot be read ({exc}); delete it to resume "
                        "from an earlier one") from None


def saved_states(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete state in output_dir, oldest first."""
    folder = Path(output_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_PATTERN.match(p.name))]
    return sorted(found)


def latest_state(output_dir: Path) -> Path | None:
    states = saved_states(output_dir)
    return states[-1][1] if states else None


def prune_checkpoints(output_dir: Path, name: str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` intermediate LoRAs and states; returns what was removed."""
    removed: list[Path] = []
    loras = sorted(Path(output_dir).glob(f"{glob.escape(name)}-step[0-9]*{LORA_WEIGHT_SUFFIX}"))
    states = [path for _, path in saved_states(output_dir)]
    for paths in (loras, states):
        for path in paths[: max(len(paths) - keep_last, 0)]:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
