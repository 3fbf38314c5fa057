"""A written LoRA loaded by diffusers' own `load_lora_weights` into the flavour's pipeline at its real widths.

The transformer is built from the model folder's config with every base tensor a stride-0 view of one zero
(no memory, any size), so diffusers' converters (ComfyUI/BFL and kohya names, fused qkv
split at the real widths) and peft's injection run exactly as for a user, in a few hundred MB. "Every key used":
diffusers reports no unexpected or missing LoRA keys, and every adapter tensor peft created holds a loaded value.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.registry import Flavour


@dataclass(frozen=True)
class LoraLoad:
    path: Path
    file_tensors: int  # tensors in the file
    adapter_tensors: int  # LoRA tensors peft created in the transformer (all loaded)
    warnings: tuple[str, ...]  # what diffusers and peft logged about unexpected or missing keys

    @property
    def ok(self) -> bool:
        return self.adapter_tensors > 0 and not self.warnings


_KEY_WORDS = ("unexpected key", "missing key", "were not used", "not used by", "ignored")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(word in text.lower() for word in _KEY_WORDS):
            self.lines.append(text.splitlines()[0][:300])


def _meta_pipeline(flavour: Flavour, config_folder: Path):  # noqa: ANN202 - a diffusers pipeline
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, flavour.transformer_class)
    with init_empty_weights():
        transformer = cls.from_config(cls.load_config(str(config_folder)))
    # On the CPU but in no memory: every base tensor is a stride-0 view of one zero. peft puts an adapter on its
    # base layer's device, so a meta base would leave the loaded adapter on meta too.
    for module in transformer.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            module._parameters[name] = torch.nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape),
                                                          requires_grad=False)
    pipeline = getattr(diffusers, flavour.pipeline_class)
    names = [name for name in pipeline._get_signature_keys(pipeline)[0] if name != "transformer"]
    return pipeline(transformer=transformer, **dict.fromkeys(names))


def load_in_diffusers(path: str | Path, flavour: Flavour, config_folder: str | Path) -> LoraLoad:
    """Loads the LoRA file at `path` into a meta-device pipeline of `flavour` configured by
    `config_folder` (the model's transformer/ folder) and says what was used."""
    from safetensors import safe_open

    pipe = _meta_pipeline(flavour, Path(config_folder))
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)
        logger.setLevel(logging.WARNING)  # the trainer silences libraries; their key warnings are the point here
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(collect)
            logger.setLevel(level)
    collect.lines += [str(w.message).splitlines()[0][:300] for w in caught
                      if any(word in str(w.message).lower() for word in _KEY_WORDS)]
    adapter = [(name, p) for name, p in pipe.transformer.named_parameters() if "lora_" in name]
    unloaded = [name for name, p in adapter if p.is_meta]
    with safe_open(str(path), "pt") as handle:
        count = len(list(handle.keys()))
    problems = tuple(collect.lines) + ((f"{len(unloaded)} adapter tensors left unloaded, e.g. {unloaded[0]}",)
                                       if unloaded else ())
    loaded = [p for _, p in adapter if not p.is_meta]
    if not all(torch.isfinite(p).all() for p in loaded):
        problems += ("non-finite adapter values",)
    ups = [p for name, p in adapter if "lora_B" in name and not p.is_meta]
    if ups and all(not p.any() for p in ups):  # B starts at zero: all zero means nothing of the file arrived
        problems += ("every lora_B is zero: the file's values did not arrive",)
    return LoraLoad(Path(path), count, len(loaded), problems)
