"""Several GPUs in the memory estimator: which mode the trainer runs (`choose_mode`, which trainer/distributed.py
uses too, so the estimate and the run always agree) and what each GPU holds of the frozen base under it. Torch-free.

The model, per GPU, for N processes (one per GPU, as trainer/distributed.py runs them):
- ddp: every GPU holds a full copy: the frozen base (less its swapped blocks, behind their ring), the LoRA, its
  gradients and optimiser state, and the activations of its own micro-batch (train.batch_size). Only the LoRA's
  gradients are all-reduced, after the backward, in buckets: not at the peak. Only rank 0 samples.
- fsdp (FSDP2 `fully_shard` on every block, then on the transformer, the LoRA parameters ignored): each GPU keeps
  1/N of every block's frozen weights and 1/N of the rest (embedders, modulation, norm_out, proj_out: the
  transformer's own unit). A block's full weights are gathered just before it computes, and the next block's
  are prefetched meanwhile (in the forward, the recomputation and the backward alike): the largest two
  neighbouring blocks are whole at once. The root unit is not resharded after its forward while training (FSDP2
  keeps the root gathered, as the backward needs it at once), so the non-block weights are whole from the
  forward to the end of the backward, and while sampling. The LoRA, its gradients, the optimiser and the
  activations are as under ddp. No block swap (`Distributed.adjust_plan`); quantised bases are refused (their
  weights are buffers FSDP does not shard). Every rank samples (each takes part in every forward).
- RAM, both modes: every process loads the whole pipeline into its own RAM before it moves or shards it, so
  loading and caching hold N copies; under ddp each process also keeps its own swapped blocks in RAM.

Not counted: FSDP2 pads each weight's first dimension to a multiple of N (a few rows), and the all-gather's
copy-in buffer of 1/N of a block; both are well under the 10 % allocator overhead of the other tensors.
"""

from __future__ import annotations

from dataclasses import replace

from trainer.estimator_shapes import WeightLayout
from trainer.memory.strategies import LowVramPlan, bundle_plan
from trainer.spec import QUANTISED_PRECISIONS, JobSpec

MODES = ("single", "ddp", "fsdp")
GATHERED_BLOCKS = 2  # FSDP: the block computing and the next one, prefetched


def choose_mode(spec: JobSpec, world_size: int, gpu_vram_gib: float | None) -> tuple[str, str]:
    """(mode, why) for `world_size` processes: "single", "ddp" or "fsdp".

    auto: fsdp when the memory estimator says one GPU of `gpu_vram_gib` (the job's lowvram.vram_gib wins) cannot
    hold the job even with every low-VRAM technique but block swap on, yet can with the base split over the
    GPUs. Streaming a full base from system RAM in every process costs N copies in RAM and N streams through the
    host; splitting it costs only the gathers. Otherwise ddp: the fastest, as nothing is gathered per block (with
    block swap if the plan says so). A quantised base or blocks swapped by the job itself keep ddp: fsdp refuses
    both (trainer/distributed.py, mode_problems).
    """
    if world_size <= 1:
        return "single", "one process"
    setting = spec.train.distributed
    if setting != "auto":
        return setting, "chosen in the job"
    vram = spec.lowvram.vram_gib or gpu_vram_gib
    if vram is None:
        return "ddp", "auto: no GPU memory size to judge against"
    if spec.model.base_precision in QUANTISED_PRECISIONS:
        return "ddp", f"auto: a {spec.model.base_precision} base is replicated (FSDP shards 16/32-bit bases only)"
    if spec.lowvram.blocks_to_swap:
        return "ddp", "auto: the job swaps blocks, which FSDP does not combine with"
    from trainer.estimator import estimate  # it imports this module

    plan = bundle_plan(spec, "extreme", blocks_to_swap=0)
    whole = estimate(spec, vram, 1, plan=plan, mode="single", _suggest=False)
    if whole.verdict != "will not fit":
        return "ddp", f"auto: the base fits one GPU ({whole.vram_gib:.1f} of {vram:g} GiB without block swap)"
    split = estimate(spec, vram, world_size, plan=plan, mode="fsdp", _suggest=False)
    if split.verdict == "will not fit":
        return "ddp", (f"auto: the base does not fit one GPU ({vram:g} GiB) even split {world_size} ways "
                       f"({split.vram_gib:.1f} GiB): every process streams blocks from RAM (block swap)")
    return "fsdp", (f"auto: one GPU ({vram:g} GiB) cannot hold the base ({whole.vram_gib:.1f} GiB without block "
                    f"swap); split {world_size} ways it needs about {split.vram_gib:.1f} GiB")


def plan_under(mode: str, plan: LowVramPlan) -> LowVramPlan:
    """The low-VRAM plan the run uses in `mode`: FSDP turns block swap off, as Distributed.adjust_plan does."""
    if mode != "fsdp" or not plan.blocks_to_swap:
        return plan
    return replace(plan, blocks_to_swap=0, reason=f"{plan.reason}; no block swap under FSDP".lstrip("; "))


def gathered_bytes(layout: WeightLayout) -> float:
    """FSDP: the full weights a GPU holds beside its shard while it computes: the non-block weights (the root
    stays gathered) and the largest two neighbouring blocks in execution order (one computing, one prefetched)."""
    blocks = layout.blocks
    starts = range(max(1, len(blocks) - GATHERED_BLOCKS + 1))
    neighbours = max((sum(blocks[i:i + GATHERED_BLOCKS]) for i in starts), default=0.0)
    return layout.other + neighbours


def shard_bytes(layout: WeightLayout, gpus: int) -> float:
    """FSDP: the part of the frozen base each GPU keeps, blocks and the rest alike."""
    return layout.total / gpus
