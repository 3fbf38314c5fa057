"""Several GPUs in the memory estimator: what each GPU holds of the frozen base under each mode. Torch-free. The mode
the trainer runs is chosen in trainer/estimator/auto.py (`choose_mode`, which trainer/distributed.py uses too, so
the estimate and the run always agree).

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

from trainer.estimator.shapes import WeightLayout

GATHERED_BLOCKS = 2  # FSDP: the block computing and the next one, prefetched


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
