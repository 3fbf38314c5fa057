"""The RAM verdict: the system RAM a job needs on its first run (text embeddings computed) and on a repeated run
(embeddings read from the disk cache) against the RAM this machine has available, like the VRAM verdict.

Torch-free. fits: the run's peak is at most 90 % of the available RAM; tight: up to all of it; will not fit:
more (the kernel kills the process while loading, or the system swaps for minutes). When it does not fit, the
cheapest setting that does is named: each candidate below is tried in order, the cheapest in quality and speed
first, and the first whose estimate fits is the one suggested. The CLI refuses a run that will not fit unless
`--force`; the app shows the verdict in the estimate headline before Start.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.estimator.plans import LowVramPlan
from trainer.spec import JobSpec, deep_merge, parse_spec, text_encoder_precision

GIB = 1024**3
TIGHT_SHARE = 0.90


def available_ram_gib() -> float:
    """RAM this process can reach without swapping, GiB: what the system has available (psutil) plus what the
    process already holds (the estimate's process baseline counts the interpreter and libraries it is made of)."""
    import psutil

    return (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / GIB


def ram_verdict_word(need_gib: float, available_gib: float) -> str:
    if need_gib > available_gib:
        return "will not fit"
    return "tight" if need_gib > TIGHT_SHARE * available_gib else "fits"


@dataclass(frozen=True)
class RamVerdict:
    first_run_gib: float
    repeated_gib: float
    available_gib: float
    warm: bool  # this run reads its text embeddings from the disk cache (a repeated run)
    remedy: str = ""  # the cheapest setting that fits, with its figure; empty when it fits or nothing does

    @property
    def need_gib(self) -> float:
        return self.repeated_gib if self.warm else self.first_run_gib

    @property
    def verdict(self) -> str:
        return ram_verdict_word(self.need_gib, self.available_gib)

    def line(self) -> str:
        """'RAM fits — first run 11.9 GiB, repeated runs 10.4 GiB, 20.3 GiB available' and, when it does not
        fit, what to change."""
        runs = (f"first run {self.first_run_gib:.1f} GiB, repeated runs {self.repeated_gib:.1f} GiB, "
                f"{self.available_gib:.1f} GiB available")
        text = f"RAM {self.verdict} — {runs}"
        if self.verdict == "will not fit":
            text += f"; cheapest setting that fits: {self.remedy}" if self.remedy else (
                "; no single setting makes it fit: close programs or add RAM")
        return text


# (what to set, spec overrides, plan changes): cheapest first. Blocks on disk only count with swapped blocks. An
# int8 text encoder keeps its embeddings closest to bf16's (cosine 0.9995 against fp8's 0.995 and 4-bit's 0.95 in
# bench/bench_text_encoder_quant.py), so it comes before nf4.
_REMEDIES: tuple[tuple[str, dict, dict], ...] = (
    ('data.cache_latents = "disk" (fewer cached images in memory)', {"data": {"cache_latents": "disk"}}, {}),
    ('model.text_encoder_precision = "int8"', {"model": {"text_encoder_precision": "int8"}}, {}),
    ('lowvram.swap_from = "disk"', {"lowvram": {"swap_from": "disk"}}, {"swap_from": "disk"}),
    ('model.text_encoder_precision = "nf4"', {"model": {"text_encoder_precision": "nf4"}}, {}),
    ('model.text_encoder_precision = "int8" and lowvram.swap_from = "disk"',
     {"model": {"text_encoder_precision": "int8"}, "lowvram": {"swap_from": "disk"}}, {"swap_from": "disk"}),
    ('model.text_encoder_precision = "nf4" and lowvram.swap_from = "disk"',
     {"model": {"text_encoder_precision": "nf4"}, "lowvram": {"swap_from": "disk"}}, {"swap_from": "disk"}),
    ('model.base_precision = "fp8"', {"model": {"base_precision": "fp8"}}, {}),
)


def _applies(spec: JobSpec, plan: LowVramPlan, overrides: dict, plan_changes: dict) -> bool:
    model, data = spec.model, spec.data
    wanted = overrides.get("model", {})
    smaller = {"int8": ("fp32", "bf16", "fp16"), "nf4": ("fp32", "bf16", "fp16", "fp8", "int8")}
    current = text_encoder_precision(model, plan.text_encoder_precision)  # auto: what the plan chose
    if "text_encoder_precision" in wanted and current not in smaller[wanted["text_encoder_precision"]]:
        return False
    if "base_precision" in wanted and model.base_precision not in ("fp32", "bf16", "fp16"):
        return False
    if overrides.get("data", {}).get("cache_latents") and data.cache_latents != "memory":
        return False
    return not plan_changes or (plan.blocks_to_swap > 0 and plan.swap_from != "disk")


def _needs(spec: JobSpec, plan: LowVramPlan, vram_gib: float | None, gpus: int = 1) -> tuple[float, float]:
    from trainer.estimator.auto import estimate_as_run

    result = estimate_as_run(spec, vram_gib, gpus, plan=plan)
    return result.first_run_ram_gib, result.ram_gib


def cheapest_remedy(spec: JobSpec, plan: LowVramPlan, vram_gib: float | None, available_gib: float,
                    warm: bool, gpus: int = 1) -> str:
    """The first setting in `_REMEDIES` under which this run fits `available_gib`, with its figure; ''."""
    for label, overrides, plan_changes in _REMEDIES:
        if not _applies(spec, plan, overrides, plan_changes):
            continue
        changed = parse_spec(deep_merge(spec.to_dict(), overrides))
        first, repeated = _needs(changed, replace(plan, **plan_changes), vram_gib, gpus)
        need = repeated if warm else first
        if need <= available_gib:
            return f"{label} ({need:.1f} GiB)"
    return ""


def ram_verdict(spec: JobSpec, plan: LowVramPlan, vram_gib: float | None, available_gib: float | None = None,
                warm: bool = False, gpus: int = 1) -> RamVerdict:
    """The verdict for this job under `plan` against `available_gib` (default: this machine's, now). `warm`:
    the text embeddings are already cached on disk, so this run is judged as a repeated run. `gpus`: processes
    on this machine (each loads its own copy)."""
    available = available_ram_gib() if available_gib is None else available_gib
    first, repeated = _needs(spec, plan, vram_gib, gpus)
    verdict = RamVerdict(first, repeated, available, warm)
    if verdict.verdict == "will not fit":
        verdict = replace(verdict, remedy=cheapest_remedy(spec, plan, vram_gib, available, warm, gpus))
    return verdict
