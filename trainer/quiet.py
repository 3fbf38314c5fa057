"""Keeps third-party start-up chatter (optional kernels, deprecations) out of the user's console."""

from __future__ import annotations

import logging
import os
import re
import warnings

# Warnings a library prints on every run that say nothing about the user's job: (logger name, message start).
KNOWN_HARMLESS = (
    # bitsandbytes looks for an optional CPU kernel package ('kernels') at import and falls back to its own code
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # diffusers' torchao support without torchao's optional tensor types: only torchao-serialised checkpoints need them
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
)
# How library warnings reach stderr: Python's warnings module ("file.py:12: UserWarning: ..."), the torch C++
# log ("W1206 17:51:00.573000 8489 file.py:630] ..."), and the known messages above.
_WARNING_LINE = re.compile(r"^(\S.*\.py:\d+: \w*Warning: |[WI]\d{4} \d\d:\d\d:\d\d\.\d+ )")


class _DropKnown(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def library_warning(line: str) -> bool:
    """Whether a line of a child's stderr is a library's warning rather than the child's own words."""
    return bool(_WARNING_LINE.match(line)) or any(line.startswith(start) for _, start in KNOWN_HARMLESS)


def silence_library_noise() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    for name in ("torchao", "torch.utils._pytree", "transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, start in KNOWN_HARMLESS:  # a filter on the logger that makes the record: its other warnings still show
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) and f.start == start for f in logger.filters):
            logger.addFilter(_DropKnown(start))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def disable_loading_bars() -> None:
    """The libraries' own load bars would interleave with ours; the session reports loading as a phase."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
