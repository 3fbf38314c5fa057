"""The memory estimator: torch-free prediction of the VRAM and system RAM a job needs, phase by phase.

Layers, each importing only the ones below it (and trainer.registry, trainer.spec, trainer.memory.strategies'
bundles):

- `plans`: the low-VRAM plan a run follows (`LowVramPlan`) and what a multi-GPU mode changes in it; `shapes`:
  every Linear of the FLUX transformers and the text encoders' sizes. Data, no estimating.
- `activations`, `sharding`: the working memory of one step, and what each GPU holds of the base under FSDP.
- `core`: `estimate(spec, plan, ...)`, the memory of one job under one given plan and mode, with its verdict.
- `auto`: the choices the trainer makes with it (the multi-GPU mode, the `auto` low-VRAM strategy);
  `suggest`: the cheapest change that makes a job fit; `job`: `estimate_job`, what the CLI and the app show
  (the plan and mode chosen as the run chooses them, the verdict and the suggestion).

This file imports nothing, so importing one layer never loads the others.
"""
