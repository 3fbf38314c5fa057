"""Which model family a LoRA file was trained for, told from its header alone (no torch): lora.init_from is
checked before anything loads, so a FLUX.1 LoRA given to a FLUX.2 job is refused in one line at once.

What says so, first match wins:
  metadata  flux_lora_studio.family (ours), ss_base_model_version (kohya: "flux1"), modelspec.architecture
            ("flux-1-dev/lora", "flux-2-klein-base-9b/lora"); a Stable Diffusion name there is another family
  keys      layers only one family has (any prefix: diffusers `transformer.`, ComfyUI `diffusion_model.`, kohya
            `lora_unet_` with `_` for `.`): FLUX.1 per-block modulation, its separate single-block q/k/v and
            proj_mlp, its `ff.net` MLPs; FLUX.2's shared modulation, fused single-block projection and
            `ff.linear_in` MLPs. Attention-only double-block LoRAs look the same in both: nothing is concluded.
"""

from __future__ import annotations

import re
from pathlib import Path

from trainer.registry import FAMILIES
from trainer.regular_files import NOT_REGULAR
from trainer.sources.recognise import NotSafetensors, read_raw_header

_METADATA_KEYS = ("flux_lora_studio.family", "ss_base_model_version", "modelspec.architecture")
_FLUX = re.compile(r"^flux[-_. ]?([12])", re.IGNORECASE)
_STABLE_DIFFUSION = re.compile(r"stable[-_ ]?diffusion|^sd(xl|3|_v|-v|\d)|^sdxl", re.IGNORECASE)
_KEY_MARKERS = (
    (re.compile(r"double_blocks[._]\d+[._](img|txt)_mod[._]lin|single_blocks[._]\d+[._]modulation[._]lin"),
     "flux1"),
    (re.compile(r"single_transformer_blocks[._]\d+[._](proj_mlp|norm[._]linear|attn[._]to_[qkv]\b)"), "flux1"),
    (re.compile(r"transformer_blocks[._]\d+[._]ff(_context)?[._]net[._]"), "flux1"),
    (re.compile(r"to_qkv_mlp_proj|(double|single)_stream_modulation|[._]ff(_context)?[._]linear_(in|out)"),
     "flux2"),
)


def lora_family(path: str | Path) -> tuple[str, str]:
    """(family, what says so) of a LoRA file: family flux1, flux2, `other` (a non-FLUX model named in the
    metadata) or '' when nothing tells. Raises NotSafetensors when the file cannot be read as safetensors."""
    header = read_raw_header(path)
    metadata = header.get("__metadata__")
    metadata = metadata if isinstance(metadata, dict) else {}
    for key in _METADATA_KEYS:
        value = str(metadata.get(key, "")).strip()
        if match := _FLUX.match(value):
            return f"flux{match.group(1)}", f"its metadata has {key} = {value}"
        if _STABLE_DIFFUSION.search(value):
            return "other", f"its metadata has {key} = {value}"
    for name in header:
        for pattern, family in _KEY_MARKERS:
            if pattern.search(name):
                return family, f"its keys are {FAMILIES[family].label}'s, e.g. {name}"
    return "", ""


def check_init_from(path: str | Path, family: str) -> str | None:
    """The preflight line for lora.init_from: missing, a folder, not safetensors, or a LoRA of another model
    family than the job's; None when it may fit (rank, targets and shapes are compared when it loads)."""
    field, file = "lora.init_from", Path(path).expanduser()
    if not file.exists():
        return f"{field}: file '{file}' does not exist"
    if file.is_dir():
        return f"{field}: '{file}' is a folder; give the LoRA's .safetensors file"
    if file.suffix.lower() != ".safetensors":
        return f"{field}: '{file.name}' is not a .safetensors LoRA file"
    if not file.is_file():  # a FIFO would block the header's read
        return f"{field}: '{file}' {NOT_REGULAR}; give the LoRA's .safetensors file"
    try:
        found, evidence = lora_family(file)
    except NotSafetensors as exc:
        return f"{field}: '{file}' is not a readable safetensors file ({exc})"
    if not found or found == family:
        return None
    label = FAMILIES[family].label
    what = f"a {FAMILIES[found].label} LoRA" if found in FAMILIES else "a LoRA for another model (not FLUX)"
    return (f"{field}: '{file.name}' is {what} ({evidence}), but this job trains {label} (model.family = "
            f"{family}); give a {label} LoRA or clear {field} to start a new one")
