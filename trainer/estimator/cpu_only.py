"""The memory estimate of a run whose device is the CPU: the device's memory and the host's are the same RAM.

The estimator (trainer/estimator/core.py) predicts each phase as VRAM on the device plus RAM on the host. When the
device is the CPU (no GPU, or a rehearsal of the real path on the CPU), the trainer runs the same code with plain
copies: a block or text-encoder layer streamed "to the device" is copied into a ring slot in the same RAM, the
swapped weights wait in host masters. So one phase needs, in one RAM, the host's share as predicted plus the
device's tensors (ring slots included), less what only a GPU has: the CUDA context and the caching allocator's
overhead; and the process itself is lighter without the CUDA libraries (PROCESS_RAM_GIB_CPU, not PROCESS_RAM_GIB).
What only the CPU has is added: glibc's heap holes from the training step on (HEAP_BYTES_PER_TRAINABLE).

What it predicts is the process's resident memory, anonymous and file-backed together. The trainer's own loaders
(every text encoder, single files, quantised or block-cached transformers) keep no safetensors file mapped
(trainer/sources/reader.py reopens the file for each tensor and copies it), so little is file-backed: klein base 9B
measured 0.11 GiB at its loading peak.
"""

from __future__ import annotations

from trainer import registry
from trainer.estimator.activations import text_encoder_memory
from trainer.estimator.auto import estimate_as_run, resolve_lowvram
from trainer.estimator.core import CONTEXT, GIB, OVERHEAD, PROCESS_RAM_GIB, loading_parts
from trainer.estimator.shapes import lora_param_counts
from trainer.spec import JobSpec, with_text_encoder_precision

# Python, torch, diffusers and transformers imported, before any model (CPU-only torch: no CUDA libraries).
# Measured by bench/rehearse.py on klein base 9B once the text encoder was freed (the heap trimmed): caching
# latents 0.73 GiB resident with the VAE (0.16) and a few latents; 1.0 before, fitted to a run whose heap held
# the freed slices of its streamed loads.
PROCESS_RAM_GIB_CPU = 0.5
# glibc's heap, where a GPU has its caching allocator's overhead (left out above): the first step makes each LoRA
# parameter's optimiser state (fused backward) between the backward's freed temporaries, so the heap's arena grows
# scattered, and the later steps' and sampling's temporaries fault its holes back in, resident until the step's
# trim (trainer/session.py). About HEAP_BYTES_PER_TRAINABLE bytes per trainable parameter from the training step
# on. Measured by bench/rehearse.py: FLUX.1 dev (65.4 M LoRA parameters) 15.16 GiB at the training step and 15.49
# sampling against 13.89 and 13.48 without it (+1.27, +2.01 GiB); before the fused backward trimmed after each first
# step 32 bytes (klein base 9B +1.33 GiB with 43.5 M, FLUX.1 +1.97); klein base 9B widths, 5 blocks deep, 7.9 M
# (bench/rehearse_shallow.py): +0.07 GiB over the estimate without it.
HEAP_BYTES_PER_TRAINABLE = 20.0
# The share of the VAE's parameters that encode (encoder and quant conv: 34.3 M of 83.8 M in AutoencoderKL, 34.4 M of
# 84.0 M in AutoencoderKLFlux2). diffusers maps the VAE of a folder, so caching latents reads only the encoder's
# pages; a single file is read whole by the trainer. Measured caching latents: hub layouts 0.69-0.75 GiB, ComfyUI
# files 0.79-0.83 (klein base 4B and 9B, FLUX.1 dev).
VAE_ENCODER_SHARE = 0.41


def cpu_only_phases(spec: JobSpec, first_run: bool = True, ram_gib: float | None = None) -> dict[str, float]:
    """Phase -> GiB of RAM for `spec` run with the CPU as its device; phases that do not run are left out.
    `first_run`: the text encoder loads even where data.cache_text_embeddings is "disk" (a cold cache).
    `ram_gib`: the RAM available, from which the session resolves what the job leaves to auto.
    "loading" is the pipeline's load (text encoders and VAE), "loading transformer" the transformer's, which
    comes after the caches are filled."""
    if first_run and spec.data.cache_text_embeddings == "disk":
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"cache_text_embeddings": "memory"})})
    plan = resolve_lowvram(spec, None, ram_gib=ram_gib)  # the session's plan on a device without VRAM
    spec = with_text_encoder_precision(spec, plan.text_encoder_precision)  # auto: what the plan chose
    result = estimate_as_run(spec, None, plan=plan)
    lighter = PROCESS_RAM_GIB - PROCESS_RAM_GIB_CPU
    f = registry.get_flavour(spec.model.family, spec.model.flavour)
    holes = HEAP_BYTES_PER_TRAINABLE * lora_param_counts(f, spec.lora.targets, spec.lora.rank, spec.lora.type)[1] / GIB
    phases: dict[str, float] = {}
    for name, phase in result.phases.items():
        if not phase.parts and not phase.ram_gib:
            continue
        device = sum(value for part, value in phase.parts.items() if part not in (CONTEXT, OVERHEAD))
        if name == "caching latents":  # the VAE "on the device" is the one the host holds: count it once
            vae = phase.parts.get("vae", 0.0)
            device -= vae + (0.0 if spec.model.vae else vae * (1 - VAE_ENCODER_SHARE))
        phases[name] = phase.ram_gib + device - lighter
        if name in ("training step", "validation sampling"):
            phases[name] += holes
    loads = loading_parts(spec, plan)  # no device tensors while loading: the CUDA context only
    phases["loading"], phases["loading transformer"] = loads["text encoders"] - lighter, loads["transformer"] - lighter
    return phases


def text_only_gib(spec: JobSpec) -> float:
    """RAM of a process that loads the pipeline without its transformer and caches the text embeddings on the CPU:
    the process, the VAE (it loads with the pipeline) and the text encoders whole with their working memory."""
    from trainer.estimator.core import VAE_PARAMS

    f = registry.get_flavour(spec.model.family, spec.model.flavour)
    vae = 0.0 if f.is_demo else VAE_PARAMS * 2
    return PROCESS_RAM_GIB_CPU + (text_encoder_memory(f, spec, "cpu")[3] + vae) / GIB
