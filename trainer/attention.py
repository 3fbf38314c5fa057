"""`advanced.attention`: which attention kernel the transformer runs, through diffusers' attention dispatcher.

sdpa (default) is torch's scaled_dot_product_attention, which picks a fused kernel itself. flash (flash-attn),
sage (SageAttention) and xformers are separate packages with their own GPU requirements; a job that names one
the machine cannot run is refused before anything loads, with the reason. SageAttention has no backward pass,
so it renders the samples while the training steps keep sdpa (the log says so).

Torch is imported only to read the GPU's compute capability, and only when a backend other than sdpa is chosen.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

from trainer.spec import QUANTISED_PRECISIONS, JobSpec

# the spec's name → diffusers' AttentionBackendName value
DISPATCHER_NAMES = {"sdpa": "native", "flash": "flash", "sage": "sage", "xformers": "xformers"}
_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention"),
             "xformers": ("xformers", "xformers")}
# (major, minor) compute capability each kernel needs: flash-attn 2 and SageAttention from Ampere on
_MIN_CAPABILITY = {"flash": (8, 0), "sage": (8, 0), "xformers": (6, 0)}
_SIXTEEN_BIT_ONLY = ("flash", "sage")  # their kernels take bf16/fp16 queries only
TRAINS_WITH = {"sdpa": "sdpa", "flash": "flash", "sage": "sdpa", "xformers": "xformers"}  # sage: no backward


def gpu_capability() -> tuple[int, int] | None:
    """The first CUDA GPU's compute capability; None without one."""
    import torch

    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None


def _computes_in_16_bit(spec: JobSpec) -> bool:
    return computes_in_16_bit(spec.train.mixed_precision, spec.model.base_precision)


def computes_in_16_bit(mixed_precision: str, base_precision: str) -> bool:
    """Whether attention sees bf16/fp16 queries: mixed precision on, or a 16-bit or quantised base."""
    return mixed_precision != "no" or base_precision in ("bf16", "fp16") or base_precision in QUANTISED_PRECISIONS


def attention_problems(spec: JobSpec, capability: tuple[int, int] | None) -> list[str]:
    """Why this machine cannot run advanced.attention (empty when it can). `capability`: the GPU's, None: none."""
    backend = spec.advanced.attention
    problem = backend_problem(backend, capability, _computes_in_16_bit(spec))
    return [f"advanced.attention: '{backend}' {problem}"] if problem else []


def installed(backend: str) -> bool:
    """Whether `backend`'s package is installed (sdpa is torch's own)."""
    return backend == "sdpa" or importlib.util.find_spec(_PACKAGES[backend][0]) is not None


def backend_problem(backend: str, capability: tuple[int, int] | None, sixteen_bit: bool) -> str:
    """Why `backend` cannot run on a GPU of `capability` (None: no GPU) for a job that computes in 16 bits or not,
    with the fix; "" when it can. The page shows these beside the menu; validate refuses with them."""
    if backend == "sdpa":
        return ""
    fix = 'or use the default "sdpa"'
    package = _PACKAGES[backend][1]
    if not installed(backend):
        return f"needs the {package} package, which is not installed; install it (pip install {package}) {fix}"
    if capability is None:
        return f"runs on a CUDA GPU only and none is available; {fix[3:]}"
    need = _MIN_CAPABILITY[backend]
    if capability < need:
        return (f"needs a GPU of compute capability {need[0]}.{need[1]} or newer; this one is "
                f"{capability[0]}.{capability[1]}; {fix[3:]}")
    if backend in _SIXTEEN_BIT_ONLY and not sixteen_bit:
        return f'computes in bf16/fp16 only, and this job computes in fp32; set train.mixed_precision = "bf16" {fix}'
    return ""


def check_attention(spec: JobSpec) -> list[str]:
    """attention_problems on this machine (torch loads only for a backend other than sdpa)."""
    return [] if spec.advanced.attention == "sdpa" else attention_problems(spec, gpu_capability())


def set_backend(transformer: Any, backend: str) -> None:  # noqa: ANN401 - a diffusers model
    """Route every attention of the transformer through `backend` (the spec's name)."""
    transformer.set_attention_backend(DISPATCHER_NAMES[backend])


@contextlib.contextmanager
def sampling_attention(transformer: Any, spec: JobSpec) -> Iterator[None]:  # noqa: ANN401
    """The chosen backend while sampling when training uses another (sage); back to the training one after."""
    backend = spec.advanced.attention
    if TRAINS_WITH[backend] == backend:
        yield
        return
    set_backend(transformer, backend)
    try:
        yield
    finally:
        set_backend(transformer, TRAINS_WITH[backend])
