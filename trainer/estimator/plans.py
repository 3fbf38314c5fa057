"""The low-VRAM plan a run follows, and what a multi-GPU mode changes in it. Torch-free data, the bottom of the
estimator: the session, the strategies' bundles (trainer/memory/strategies.py), the estimate and the multi-GPU
runner all read the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.spec import QUANTISED_PRECISIONS, JobSpec

MODES = ("single", "ddp", "fsdp")


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
    # the text encoders' storage the run loads them in: the job's model.text_encoder_precision, or auto's choice
    text_encoder_precision: str = "bf16"
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


def plan_under(mode: str, plan: LowVramPlan) -> LowVramPlan:
    """The low-VRAM plan the run uses in `mode`: FSDP turns block swap off, as Distributed.adjust_plan does."""
    if mode != "fsdp" or not plan.blocks_to_swap:
        return plan
    return replace(plan, blocks_to_swap=0, reason=f"{plan.reason}; no block swap under FSDP".lstrip("; "))


def mode_problems(spec: JobSpec, mode: str) -> list[str]:
    """What the job sets that the mode cannot do, one line each (empty when it can run)."""
    if mode != "fsdp":
        return []
    problems = []
    if spec.model.base_precision in QUANTISED_PRECISIONS:
        problems.append(f"train.distributed: fsdp shards 16/32-bit bases, not a {spec.model.base_precision} one "
                        "(its weights are buffers FSDP does not split); use ddp: a quantised base fits one GPU")
    if spec.lowvram.blocks_to_swap:
        problems.append("lowvram.blocks_to_swap: block swap does not combine with train.distributed = fsdp (each "
                        "GPU holds only its share of every block); set it to 0 or use ddp")
    return problems
