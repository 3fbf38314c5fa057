"""Low-VRAM strategies: named bundles of the memory techniques, resolved into one concrete plan.

Torch-free. A bundle resolves into the estimator's `LowVramPlan` (trainer/estimator/plans.py); a key set in the
job's [lowvram] section overrides its bundle's value. `auto` is the estimator's choice among these bundles: the
lightest that fits (trainer/estimator/auto.py).

The bundles, lightest first (each costs some speed to save memory):
- none: everything on the GPU, no recomputation. Fastest; needs the most memory.
- conservative: gradient checkpointing on every block (≈20-30 % slower, activations shrink ~25x), text
  encoders streamed layer by layer to the GPU while embeddings are cached.
- aggressive: conservative + half of the flavour's swappable blocks streamed from pinned CPU memory, checkpoint
  inputs offloaded to the CPU, the optimiser step fused into backward (no gradient buffers kept).
- extreme: every swappable block streamed, optimiser state and step on the CPU, text encoders run on the CPU.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from trainer import registry
from trainer.estimator.plans import LowVramPlan
from trainer.spec import JobSpec, text_encoder_precision

CONCRETE = ("none", "conservative", "aggressive", "extreme")


# blocks_to_swap in a bundle is a share of the flavour's maximum, rounded down.
BUNDLES: dict[str, dict[str, Any]] = {
    "none": dict(blocks_to_swap=0.0, swap_prefetch=1, pin_memory=True, gradient_checkpointing=False,
                 checkpointing_interval=1, cpu_offload_checkpointing=False, optimizer_offload=False,
                 fused_backward=False, text_encoder_device="gpu", swap_from="ram"),
    "conservative": dict(blocks_to_swap=0.0, swap_prefetch=1, pin_memory=True, gradient_checkpointing=True,
                         checkpointing_interval=1, cpu_offload_checkpointing=False, optimizer_offload=False,
                         fused_backward=False, text_encoder_device="offload", swap_from="ram"),
    "aggressive": dict(blocks_to_swap=0.5, swap_prefetch=1, pin_memory=True, gradient_checkpointing=True,
                       checkpointing_interval=1, cpu_offload_checkpointing=True, optimizer_offload=False,
                       fused_backward=True, text_encoder_device="offload", swap_from="ram"),
    "extreme": dict(blocks_to_swap=1.0, swap_prefetch=2, pin_memory=True, gradient_checkpointing=True,
                    checkpointing_interval=1, cpu_offload_checkpointing=True, optimizer_offload=True,
                    fused_backward=True, text_encoder_device="cpu", swap_from="ram"),
}
# the [lowvram] keys a job may set over its bundle (the text encoders' precision is the model section's)
_PLAN_KEYS = tuple(f.name for f in fields(LowVramPlan)
                   if f.name not in ("strategy", "reason", "text_encoder_precision"))


def _incompatible_with_fused_backward(spec: JobSpec) -> str:
    if spec.train.mixed_precision == "fp16":
        return "fp16 mixed precision"
    if spec.train.optimizer == "prodigy":
        return "Prodigy"
    return ""


def bundle_plan(spec: JobSpec, strategy: str, blocks_to_swap: int | None = None, reason: str = "") -> LowVramPlan:
    """The bundle `strategy` with the job's explicit [lowvram] keys on top; `blocks_to_swap` overrides both."""
    if strategy not in BUNDLES:
        raise ValueError(f"lowvram.strategy: '{strategy}' is not a concrete strategy; allowed: {', '.join(CONCRETE)}")
    most = registry.get_flavour(spec.model.family, spec.model.flavour).max_blocks_to_swap
    values = dict(BUNDLES[strategy])
    values["blocks_to_swap"] = int(values["blocks_to_swap"] * most)
    explicit = spec.lowvram.model_dump(exclude_none=True)
    values.update({k: v for k, v in explicit.items() if k in _PLAN_KEYS})
    if blocks_to_swap is not None:
        values["blocks_to_swap"] = blocks_to_swap
    if "fused_backward" not in explicit and _incompatible_with_fused_backward(spec):
        values["fused_backward"] = False  # the bundle's default steps aside; an explicit true is refused by the spec
    if "optimizer_offload" not in explicit and spec.train.mixed_precision == "fp16":
        values["optimizer_offload"] = False  # loss scaling unscales gradients beside the optimiser
    if "cpu_offload_checkpointing" not in explicit and spec.advanced.tread:
        values["cpu_offload_checkpointing"] = False  # TREAD's bypass needs torch's non-reentrant checkpoint
    if values["blocks_to_swap"] and "gradient_checkpointing" not in explicit:
        values["gradient_checkpointing"] = True
    if not values["gradient_checkpointing"]:
        values["cpu_offload_checkpointing"] = False
    return LowVramPlan(strategy=strategy, reason=reason, text_encoder_precision=text_encoder_precision(spec.model),
                       **values)
