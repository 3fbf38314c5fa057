"""The memory estimate of a run whose device is the CPU: the device's memory and the host's are the same RAM.

The estimator (trainer/estimator/core.py) predicts each phase as VRAM on the device plus RAM on the host. When the
device is the CPU (no GPU, or a rehearsal of the real path on the CPU), moving a module "to the device" moves
nothing, so one phase needs, in the same RAM:

  - the host's share, as predicted (the process, the loaded pipeline, swapped blocks, offloaded state, caches);
  - plus the device's tensors, except what only a GPU has: no CUDA context, no caching-allocator overhead, no
    swap ring (blocks swapped from the CPU to the CPU are already where they compute), and a text encoder
    counted once, whole, with its working memory (its layers do not stream anywhere);
  - on a CPU-only machine the process itself is lighter: torch without the CUDA libraries (PROCESS_RAM_GIB_CPU).

What it predicts is the process's resident memory, anonymous and file-backed together: weights that the loader
leaves mapped from their safetensors files are as resident as copied ones while they are used.
"""

from __future__ import annotations

from trainer import registry
from trainer.estimator.activations import text_encoder_memory
from trainer.estimator.auto import estimate_as_run, resolve_lowvram
from trainer.estimator.core import CONTEXT, GIB, OVERHEAD, PROCESS_RAM_GIB
from trainer.spec import JobSpec

# Python, torch, diffusers and transformers imported, before any model; measured by bench/rehearse.py as the
# trainer's resident memory when loading begins (CPU-only torch: no CUDA libraries).
PROCESS_RAM_GIB_CPU = 1.0

_NOT_ON_CPU = ("swap ring",)  # part labels that exist only on a GPU


def cpu_only_phases(spec: JobSpec, first_run: bool = True) -> dict[str, float]:
    """Phase -> GiB of RAM for `spec` run with the CPU as its device; phases that do not run are left out.
    `first_run`: the text encoder loads even where data.cache_text_embeddings is "disk" (a cold cache)."""
    f = registry.get_flavour(spec.model.family, spec.model.flavour)
    if first_run and spec.data.cache_text_embeddings == "disk":
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"cache_text_embeddings": "memory"})})
    plan = resolve_lowvram(spec, None)  # the session's plan on a device without VRAM
    result = estimate_as_run(spec, None, plan=plan)
    lighter = PROCESS_RAM_GIB - PROCESS_RAM_GIB_CPU
    phases: dict[str, float] = {}
    for name, phase in result.phases.items():
        if not phase.parts and not phase.ram_gib:
            continue
        device = sum(value for part, value in phase.parts.items()
                     if part not in (CONTEXT, OVERHEAD) and not part.startswith(_NOT_ON_CPU))
        phases[name] = phase.ram_gib + device - lighter
    text = "caching text embeddings"
    if text in phases and spec.data.cache_text_embeddings != "disk":
        # the encoder whole in RAM with its working memory, in place of its host share and device share
        host_share = text_encoder_memory(f, spec, plan.text_encoder_device)[3]
        whole_and_work = text_encoder_memory(f, spec, "cpu")[3]
        phases[text] = result.phases[text].ram_gib + (whole_and_work - host_share) / GIB - lighter
    return phases
