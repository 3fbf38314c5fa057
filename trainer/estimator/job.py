"""What the CLI (`python -m trainer estimate`) and the app show of a job: the estimate of what the run would do,
with the verdict and, when it does not fit, the cheapest change that makes it fit. The top of the estimator.
"""

from __future__ import annotations

from trainer.estimator.auto import estimate_as_run
from trainer.estimator.core import Estimate
from trainer.estimator.plans import LowVramPlan
from trainer.estimator.suggest import suggest as suggest_change
from trainer.spec import JobSpec


def estimate_job(spec: JobSpec, gpu_vram_gib: float | None = None, gpus: int = 1, *,
                 fused_attention: bool | None = None, plan: LowVramPlan | None = None, mode: str | None = None,
                 suggest: bool = True) -> Estimate:
    """VRAM per GPU and RAM per phase of `spec` on `gpus` GPUs as the trainer would run it (plan and mode: see
    auto.estimate_as_run), the verdict against `gpu_vram_gib` (default: the job's lowvram.vram_gib) and, with
    `suggest`, what to change when it does not fit."""
    result = estimate_as_run(spec, gpu_vram_gib, gpus, plan=plan, mode=mode, fused_attention=fused_attention)
    vram = spec.lowvram.vram_gib if gpu_vram_gib is None else gpu_vram_gib
    if suggest and vram is not None and result.verdict != "fits":
        result.suggestion = suggest_change(spec, vram, gpus, fused_attention, result.mode)
    return result
