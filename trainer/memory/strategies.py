"""Low-VRAM strategies: named bundles of the memory techniques, resolved into one concrete plan.

Torch-free: the UI, the estimator and the session all read the same plan. A key set in the job's [lowvram]
section overrides its bundle's value; `auto` asks the memory estimator for the lightest bundle that fits.

The bundles, lightest first (each costs some speed to save memory):
- none: everything on the GPU, no recomputation. Fastest; needs the most memory.
- conservative: gradient checkpointing on every block (≈20-30 % slower, activations shrink ~25x), text
  encoders streamed layer by layer to the GPU while embeddings are cached.
- aggressive: conservative + half of the flavour's swappable blocks streamed from pinned CPU memory, checkpoint
  inputs offloaded to the CPU, the optimiser step fused into backward (no gradient buffers kept).
- extreme: every swappable block streamed, optimiser state and step on the CPU, text encoders run on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from trainer import registry
from trainer.spec import JobSpec

CONCRETE = ("none", "conservative", "aggressive", "extreme")


@dataclass(frozen=True)
class LowVramPlan:
    strategy: str  # the concrete bundle; "auto" never appears here
    blocks_to_swap: int
    swap_prefetch: int
    pin_memory: bool
    gradient_checkpointing: bool
    checkpointing_interval: int
    cpu_offload_checkpointing: bool
    optimizer_offload: bool
    fused_backward: bool
    text_encoder_device: str
    swap_from: str = "ram"  # where swapped blocks wait: "ram" (pinned) or "disk" (a block cache file)
    reason: str = ""  # how it was chosen, for the log

    def describe(self) -> str:
        parts = [f"strategy {self.strategy}"]
        if self.blocks_to_swap:
            parts.append(f"{self.blocks_to_swap} blocks swapped (prefetch {self.swap_prefetch}"
                         f"{', pinned' if self.pin_memory else ', not pinned'}"
                         f"{', read from disk' if self.swap_from == 'disk' else ''})")
        if self.gradient_checkpointing:
            every = "every block" if self.checkpointing_interval == 1 else f"every {self.checkpointing_interval} blocks"
            parts.append(f"checkpointing {every}" + (" with CPU offload" if self.cpu_offload_checkpointing else ""))
        if self.optimizer_offload:
            parts.append("optimiser on the CPU")
        if self.fused_backward:
            parts.append("fused backward")
        parts.append(f"text encoders on {self.text_encoder_device}")
        return ", ".join(parts) + (f" ({self.reason})" if self.reason else "")


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
_PLAN_KEYS = tuple(f.name for f in fields(LowVramPlan) if f.name not in ("strategy", "reason"))


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
    return LowVramPlan(strategy=strategy, reason=reason, **values)


def resolve_lowvram(spec: JobSpec, vram_gib: float | None, gpus: int = 1) -> LowVramPlan:
    """The plan the session runs. `vram_gib`: the GPU's memory (the job's lowvram.vram_gib wins); None: no GPU.
    `gpus`: processes of a multi-GPU run, whose sharding (train.distributed) auto judges the bundles under."""
    strategy = spec.lowvram.strategy
    if strategy != "auto":
        return bundle_plan(spec, strategy, reason="chosen in the job")
    target = spec.lowvram.vram_gib or vram_gib
    if target is None:
        return bundle_plan(spec, "none", reason="auto: no GPU, nothing to save")
    return choose_auto(spec, target, gpus)


def choose_auto(spec: JobSpec, vram_gib: float, gpus: int = 1) -> LowVramPlan:
    """The lightest bundle the estimator says fits in `vram_gib`; inside the swapping bundles the fewest swapped
    blocks that fit. When nothing fits: extreme, and the estimator's verdict says what else to change."""
    from trainer import estimator  # the estimator imports this module

    most = registry.get_flavour(spec.model.family, spec.model.flavour).max_blocks_to_swap

    def fits(plan: LowVramPlan) -> float | None:
        result = estimator.estimate(spec, vram_gib, gpus, plan=plan, _suggest=False)
        return result.vram_gib if result.verdict == "fits" else None

    for strategy in CONCRETE:
        plan = bundle_plan(spec, strategy)
        if plan.blocks_to_swap and spec.lowvram.blocks_to_swap is None:
            # memory falls as blocks are swapped: search the fewest that fit between none and the flavour's most
            if fits(replace(plan, blocks_to_swap=most)) is None:
                continue
            low, high = 0, most
            while low < high:
                middle = (low + high) // 2
                if fits(replace(plan, blocks_to_swap=middle)) is None:
                    low = middle + 1
                else:
                    high = middle
            plan = replace(plan, blocks_to_swap=low)
        need = fits(plan)
        if need is not None:
            return replace(plan, reason=f"auto: fits {vram_gib:g} GiB ({need:.1f} GiB estimated)")
    plan = bundle_plan(spec, "extreme")
    return replace(plan, reason=f"auto: nothing fits {vram_gib:g} GiB; extreme is the closest")
