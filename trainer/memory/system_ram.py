"""Before anything loads: the system RAM the job will need against what is free (RAM plus swap / pagefile).

Torch-free. System RAM is the real limit as often as VRAM: a swapped block, an offloaded optimiser, a text
encoder on the CPU all move bytes from the GPU into RAM. The check warns rather than refuses: the estimate
can be off by a few per cent, and a user may accept a slow, swapping run.
"""

from __future__ import annotations

from trainer.estimator.plans import LowVramPlan
from trainer.spec import JobSpec

GIB = 1024**3


def free_memory_gib() -> tuple[float, float]:
    """(available RAM, free swap or pagefile) in GiB."""
    import psutil

    return psutil.virtual_memory().available / GIB, psutil.swap_memory().free / GIB


def _remedies(spec: JobSpec, plan: LowVramPlan) -> list[str]:
    out = []
    if spec.model.base_precision in ("fp32", "bf16", "fp16"):
        out.append('model.base_precision = "fp8" (halves the transformer in RAM while it loads)')
    if spec.data.cache_text_embeddings != "disk":
        out.append('data.cache_text_embeddings = "disk" (later runs never load the text encoders)')
    if plan.blocks_to_swap:
        out.append(f"fewer lowvram.blocks_to_swap than {plan.blocks_to_swap} (swapped blocks wait in RAM)")
    if plan.optimizer_offload:
        out.append("lowvram.optimizer_offload = false (its state waits in RAM)")
    out.append("a larger swap file / pagefile")
    return out


def shortfall_message(need_gib: float, ram_free_gib: float, swap_free_gib: float, spec: JobSpec,
                      plan: LowVramPlan) -> str | None:
    """The warning for a job needing `need_gib` of system memory, or None when it fits in free RAM."""
    if need_gib <= ram_free_gib:
        return None
    have = f"{ram_free_gib:.1f} GiB of RAM and {swap_free_gib:.1f} GiB of swap/pagefile are free"
    if need_gib <= ram_free_gib + swap_free_gib:
        return (f"system RAM: this job needs about {need_gib:.1f} GiB at its peak and {have}; it will spill into "
                "swap and load slowly. To lower it: " + "; ".join(_remedies(spec, plan)[:-1] or ["close programs"]))
    return (f"system RAM: this job needs about {need_gib:.1f} GiB at its peak but only {have}; it will likely be "
            "killed while loading. To lower it: " + "; ".join(_remedies(spec, plan)))


def ram_warning(spec: JobSpec, plan: LowVramPlan, vram_gib: float | None) -> str | None:
    """The estimator's peak RAM for the plan against this machine's free memory."""
    from trainer.estimator.auto import estimate_as_run

    need = estimate_as_run(spec, vram_gib, plan=plan).ram_gib
    ram, swap = free_memory_gib()
    return shortfall_message(need, ram, swap, spec, plan)
