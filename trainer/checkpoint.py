"""LoRA files and training states: written atomically; the LoRA in the diffusers/PEFT format.

torch is imported where tensors are handled, so the UI can list saved states without it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.files import FILE_MODE, TEMP_SUFFIX, remove_stale_temporaries, sync_folder, write_atomic

LORA_WEIGHT_SUFFIX = ".safetensors"


def save_lora_diffusers(transformer: Any, pipeline_class: type, path: Path,
                        header: dict[str, str] | None = None) -> Path:
    """Write `path` (a .safetensors file) with `transformer.`-prefixed keys via the pipeline's own saver, plus
    `header` in its metadata before it takes the name (a save killed or failing midway, a full disk, leaves no
    file without it).

    The adapter config goes in the file's metadata, so loaders use our alpha rather than guess it from the rank.
    """
    from trainer import lora_formats
    from trainer.adapters import adapter_export

    tensors, metadata = adapter_export(transformer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # named like write_atomic's temporaries, so a run killed mid-save has its leftovers removed on restart
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        pipeline_class.save_lora_weights(
            save_directory=staging,
            transformer_lora_layers=tensors,
            weight_name=path.name,
            transformer_lora_adapter_metadata=metadata,
        )
        written = staging / path.name
        if header:
            lora_formats.merge_metadata(written, header)
        os.chmod(written, FILE_MODE)  # safetensors writes 0600 files; ours follow the umask
        with open(written, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(written, path)
        sync_folder(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# ---------------------------------------------------------------- training state for exact resume

STATE_DIR = "state"
STATE_SUFFIX = ".safetensors"
_STATE_PATTERN = re.compile(rf"^step(\d{{6,}}){re.escape(STATE_SUFFIX)}$")


def state_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / STATE_DIR / f"step{step:06d}{STATE_SUFFIX}"


def save_training_state(path: Path, state: dict[str, Any]) -> Path:
    """Write the state atomically: a crash mid-write leaves the previous state, never a torn file."""
    from trainer.state_file import write_state_file

    write_atomic(Path(path), lambda tmp: write_state_file(tmp, state))
    return Path(path)


def load_training_state(path: Path) -> dict[str, Any]:
    """A safetensors file with a JSON header (trainer/state_file.py): nothing pickled, so no code ever runs."""
    from trainer.state_file import read_state_file

    try:
        return read_state_file(Path(path))
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


def remove_interrupted_writes(output_dir: Path) -> list[Path]:
    """Delete the temporary files (and staging folders) of saves a killed run left half-done in output_dir."""
    folder = Path(output_dir)
    return [p for sub in (folder, folder / STATE_DIR, folder / "samples") for p in remove_stale_temporaries(sub)]


EARLIER_RUNS = "earlier_runs"
RUN_RECORDS = ("state", "samples", "logs", "events.jsonl", "job.resolved.toml")  # what every run writes


def set_aside_earlier_run(output_dir: Path, name: str, stamp: str | None = None) -> Path | None:
    """Move what an earlier run wrote in output_dir (its states, samples, logs, events, job and this name's LoRA
    and EMA files) into output_dir/earlier_runs/<stamp>/, so a new run neither overwrites its LoRA nor mixes its
    states with the new ones (resume takes the newest step). The latent and text caches stay: keyed by content.
    Returns the folder they went to, or None when there was nothing."""
    folder = Path(output_dir)
    loras = our_loras(folder, name)
    found = [folder / entry for entry in RUN_RECORDS if (folder / entry).exists()] + loras
    if not any(p.is_file() or any(p.iterdir()) for p in found):
        return None
    import time

    target = folder / EARLIER_RUNS / (stamp or time.strftime("%Y%m%d-%H%M%S"))
    while target.exists():  # two runs within a second
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    for path in found:
        os.replace(path, target / path.name)
    sync_folder(folder)
    return target


def our_loras(output_dir: Path, name: str) -> list[Path]:
    """The LoRA files a run named `name` writes in output_dir: final and intermediate, every format, and the EMA's
    (`<name>_ema…`, trainer/ema.py)."""
    ours = re.compile(rf"{re.escape(name)}(_ema)?(-step\d{{6,}})?(_comfyui|_kohya)?{re.escape(LORA_WEIGHT_SUFFIX)}")
    return sorted(p for p in Path(output_dir).glob(f"{glob.escape(name)}*{LORA_WEIGHT_SUFFIX}")
                  if ours.fullmatch(p.name) and p.is_file())


def lora_metadata(spec: Any, steps: int, spec_toml: str | None = None) -> dict[str, Any]:  # noqa: ANN401 - a JobSpec
    """What a LoRA's header says about the run (`lora_formats.build_metadata`'s arguments but rank, alpha, format);
    `spec_toml`: the job as it ran (default: `spec` as it is)."""
    from trainer.preflight import model_source
    from trainer.spec import spec_to_toml

    return {"family": spec.model.family, "flavour": spec.model.flavour, "steps": steps,
            "trigger_words": [e.trigger for e in spec.data.datasets if e.trigger],
            "base_model": spec.model.transformer or model_source(spec),
            "spec_toml": spec_toml if spec_toml is not None else spec_to_toml(spec), "title": spec.output.name}


def repair_incomplete_loras(output_dir: Path, name: str) -> tuple[list[Path], list[Path]]:
    """(repaired, removed): LoRA files of ours whose header lacks our metadata, as a save killed between the
    weights and the header left them before saves became one rename. Each gets the header back from the job that
    wrote it (output_dir/job.resolved.toml) and its step (in its name; the final file's: the newest state, which is
    saved first); a file that cannot be told (no job, no step, unreadable) is removed: a later save rewrites it."""
    from trainer import lora_formats
    from trainer.spec import SpecError, load_spec

    repaired: list[Path] = []
    removed: list[Path] = []
    job = Path(output_dir) / "job.resolved.toml"
    for path in our_loras(output_dir, name):
        try:
            header = lora_formats.read_metadata(path)
        except (OSError, ValueError):
            header = {}
        if f"{lora_formats.METADATA_PREFIX}lora_format" in header:
            continue
        try:
            spec = load_spec(job) if job.is_file() else None
            found = re.search(r"-step(\d{6,})", path.name)
            states = saved_states(output_dir)
            step = int(found.group(1)) if found else (states[-1][0] if states else None)
            if spec is None or step is None:
                raise ValueError("nothing tells how it was made")
            tensors, existing = lora_formats.read_lora(path)
            fmt = "comfyui" if path.stem.endswith("_comfyui") else "kohya" if path.stem.endswith("_kohya") else \
                "diffusers"
            # diffusers keeps the peft config under `transformer.`-prefixed keys
            adapter = {key.removeprefix("transformer."): value
                       for key, value in json.loads(existing.get("lora_adapter_metadata", "{}")).items()}
            rank, alpha = adapter["r"], adapter.get("lora_alpha", adapter["r"])
            lora_formats.write_lora(path, tensors, {**existing, **lora_formats.build_metadata(
                rank=rank, alpha=alpha, format=fmt, **lora_metadata(spec, step))})
            repaired.append(path)
        except (OSError, ValueError, KeyError, TypeError, SpecError):
            path.unlink(missing_ok=True)
            removed.append(path)
    return repaired, removed


def prune_checkpoints(output_dir: Path, name: str, keep_last: int) -> list[Path]:
    """Delete the intermediate LoRAs (every format) and states of all but the newest `keep_last` saved steps."""
    pattern = re.compile(rf"^{re.escape(name)}-step(\d{{6,}})(_comfyui|_kohya)?{re.escape(LORA_WEIGHT_SUFFIX)}$")
    by_step: dict[int, list[Path]] = {}
    for path in Path(output_dir).glob(f"{glob.escape(name)}-step*{LORA_WEIGHT_SUFFIX}"):
        if match := pattern.match(path.name):
            by_step.setdefault(int(match.group(1)), []).append(path)
    removed: list[Path] = []
    for groups in (by_step, {step: [path] for step, path in saved_states(output_dir)}):
        for step in sorted(groups)[: max(len(groups) - keep_last, 0)]:
            for path in groups[step]:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def tensor_bytes(value: Any) -> int:  # noqa: ANN401 - a state: tensors in dicts and lists
    """Bytes of every tensor in a (nested) state."""
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return value.numel() * value.element_size() if hasattr(value, "element_size") else 0


def lora_bytes(transformer: Any, formats: list[str]) -> int:  # noqa: ANN401
    """About what the LoRA files of one save take: the adapter's weights once per format."""
    adapter = sum(p.numel() * p.element_size() for p in transformer.parameters() if p.requires_grad)
    return adapter * max(1, len(formats))


def save_lora_files(transformer: Any, pipeline_class: type, output_dir: Path, name: str, step: int | None,
                    formats: list[str], metadata: dict[str, Any], comfy_lora_dir: str = "") -> dict[str, Path]:
    """The LoRA in every requested format (step in the name for intermediate saves), each atomic.

    `metadata`: the keyword arguments of `lora_formats.build_metadata` except rank, alpha and format.
    Files in a ComfyUI layout are also copied into `comfy_lora_dir` when one is given (their paths under the keys
    'copy:<format>'); when only the diffusers format is asked for, the ComfyUI file is written for the copy.
    """
    from trainer import lora_formats
    from trainer.adapters import adapter_export

    tensors, config = adapter_export(transformer)
    rank, alpha = config.get("r", 0), config.get("lora_alpha", config.get("alpha", 0))
    written: dict[str, Path] = {}
    if comfy_lora_dir and set(formats) == {"diffusers"}:
        formats = [*formats, "comfyui"]  # ComfyUI reads its own layout: the copy needs that file
    for fmt in formats:
        path = Path(output_dir) / lora_formats.lora_filename(name, fmt, step)
        header = lora_formats.build_metadata(rank=rank, alpha=alpha, format=fmt, **metadata)
        if fmt == "diffusers":
            save_lora_diffusers(transformer, pipeline_class, path, header)
        elif fmt == "comfyui":
            lora_formats.write_lora(path, lora_formats.to_comfyui(metadata["family"], tensors, alpha, rank), header)
        else:
            lora_formats.write_lora(path, lora_formats.to_kohya(tensors, alpha, rank), header)
        written[fmt] = path
        if comfy_lora_dir and fmt != "diffusers":
            written[f"copy:{fmt}"] = lora_formats.copy_to_comfy_loras(path, comfy_lora_dir)
    return written
