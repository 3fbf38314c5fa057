"""What to change when a job does not fit: the cheapest change the estimator says makes it fit. Torch-free.

Each candidate change has a rough cost, in per cent of training speed or an equivalent loss of quality, so the
first that fits in cost order is the cheapest (figures from shared/TECHNIQUES.md, to be replaced by
measurements): a fp32 base to bf16 0 (faster, LoRA quality unchanged); text encoder streamed 1 and on the CPU 3
(the one-time caching is slower); fused backward 1 (no slowdown; clipping becomes per parameter); text embeddings
from a disk cache 5 (a first run still caches them); on several GPUs, the base split over them (fsdp) 10 (every
block is gathered three times a step: forward, recomputation, backward); checkpointing 25; checkpoint inputs
offloaded 10; block swap 12 (pinned, overlapped with compute); optimiser on the CPU 20; the strategies 25, 45
and 80 (the sum of their parts); a quantised base 30 (fp8) or 60 (nf4); a smaller batch 50 and a lower
resolution 70 (they change what is learned). With no single change enough, the changes accumulate in cost order
until the job fits, and each is then relaxed to its mildest value that still fits (e.g. the fewest swapped
blocks). FSDP swaps no blocks and refuses a quantised base: for a job that asks for fsdp, those changes say ddp.

Labels are exact settings: `lowvram.blocks_to_swap ≥ 18`, `model.base_precision = "fp8"`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from trainer import registry
from trainer.estimator.auto import estimate_as_run, resolve_lowvram
from trainer.estimator.plans import plan_under
from trainer.memory.strategies import CONCRETE
from trainer.spec import QUANTISED_PRECISIONS, JobSpec

NOTHING_FITS = "none of the supported changes is enough; use a GPU with more memory or a smaller flavour"
SWAP = "lowvram.blocks_to_swap"
DISTRIBUTED = "train.distributed"
STRATEGY_COST = {"none": 0, "conservative": 25, "aggressive": 45, "extreme": 80}


@dataclass(frozen=True)
class Change:
    setting: str  # "section.key": options of one setting replace each other
    label: str
    overrides: dict[str, dict[str, Any]]
    cost: float


def candidates(spec: JobSpec, gpu_vram_gib: float, mode: str = "single") -> list[Change]:
    """Every single change that could lower the job's memory per GPU, cheapest first; built on the plan the job
    runs in `mode` ("single", or "ddp" or "fsdp" on several GPUs: trainer/estimator/auto.py)."""
    plan = plan_under(mode, resolve_lowvram(spec, gpu_vram_gib))
    low = spec.lowvram
    most = registry.get_flavour(spec.model.family, spec.model.flavour).max_blocks_to_swap
    out: list[Change] = []

    def add(setting: str, value: Any, cost: float, label: str | None = None,
            extra: dict[str, dict[str, Any]] | None = None) -> None:
        section, key = setting.split(".")
        overrides: dict[str, dict[str, Any]] = {section: {key: value}}
        for extra_section, values in (extra or {}).items():
            overrides.setdefault(extra_section, {}).update(values)
        shown = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value
        out.append(Change(setting, label or f"{setting} = {shown}", overrides, cost))

    precision = spec.model.base_precision
    if precision == "fp32":
        add("model.base_precision", "bf16", 0)
    if plan.text_encoder_device == "gpu":
        add("lowvram.text_encoder_device", "offload", 1)
    if plan.text_encoder_device != "cpu":
        add("lowvram.text_encoder_device", "cpu", 3)
    if not plan.fused_backward and spec.train.mixed_precision != "fp16" and spec.train.optimizer != "prodigy":
        add("lowvram.fused_backward", True, 1)
    if spec.data.cache_text_embeddings != "disk":
        add("data.cache_text_embeddings", "disk", 5)
    if mode == "ddp" and precision not in QUANTISED_PRECISIONS and not low.blocks_to_swap:
        add(DISTRIBUTED, "fsdp", 10)  # not where fsdp refuses the job: a quantised base, the job's own swap
    # checkpointing is a prerequisite of the swap and the offload: a change that needs it turns it on too
    needs_checkpointing = {} if plan.gradient_checkpointing else {"lowvram": {"gradient_checkpointing": True}}
    prefix = "" if plan.gradient_checkpointing else "lowvram.gradient_checkpointing = true; "
    extra_cost = 0 if plan.gradient_checkpointing else 25
    if not plan.gradient_checkpointing:
        add("lowvram.gradient_checkpointing", True, 25)
    elif plan.checkpointing_interval > 1:
        for every in range(plan.checkpointing_interval - 1, 0, -1):
            add("lowvram.checkpointing_interval", every, 25 / every)
    if not plan.cpu_offload_checkpointing:
        add("lowvram.cpu_offload_checkpointing", True, 10 + extra_cost,
            prefix + "lowvram.cpu_offload_checkpointing = true", needs_checkpointing)
    # FSDP swaps no blocks and shards no quantised base: on auto such a job runs ddp anyway (choose_mode); a job
    # that asks for fsdp must say ddp, so those changes name it
    to_ddp = {"train": {"distributed": "ddp"}} if mode == "fsdp" and spec.train.distributed == "fsdp" else {}
    ddp_prefix = 'train.distributed = "ddp"; ' if to_ddp else ""
    if plan.blocks_to_swap < most:
        # the label gets the fewest blocks that fit once they are searched (suggest() below)
        add(SWAP, most, 12 + extra_cost, f"{ddp_prefix}{prefix}{SWAP} ≥ {most}", needs_checkpointing | to_ddp)
    if not plan.optimizer_offload:
        add("lowvram.optimizer_offload", True, 20)
    if low.strategy != "auto":
        heavier = CONCRETE[CONCRETE.index(low.strategy) + 1:]
        for strategy in heavier:
            add("lowvram.strategy", strategy, STRATEGY_COST[strategy])
        # auto picks the lightest bundle that fits, with the fewest swapped blocks; a named key of the same cost wins
        chosen = resolve_lowvram(_apply(spec, {"lowvram": {"strategy": "auto"}}), gpu_vram_gib).strategy
        if chosen in heavier:
            add("lowvram.strategy", "auto", STRATEGY_COST[chosen] + 0.5)
    if precision in ("fp32", "bf16", "fp16"):
        add("model.base_precision", "fp8", 30, f'{ddp_prefix}model.base_precision = "fp8"', to_ddp)
    if precision not in ("int4", "nf4"):
        add("model.base_precision", "nf4", 60, f'{ddp_prefix}model.base_precision = "nf4"', to_ddp)
    batch = spec.train.batch_size
    while batch > 1:
        batch //= 2
        add("train.batch_size", batch, 50 + (spec.train.batch_size / batch))
    top = max(spec.data.every_resolution())
    if not any(e.resolution for e in spec.data.datasets):
        for step, value in enumerate(v for v in (1024, 768, 512, 256) if v < top and v % spec.data.bucket_step == 0):
            add("data.resolution", value, 70 + step)
    return sorted(out, key=lambda change: change.cost)


def _apply(spec: JobSpec, overrides: dict[str, dict[str, Any]]) -> JobSpec:
    update = {section: getattr(spec, section).model_copy(update=values) for section, values in overrides.items()}
    return spec.model_copy(update=update)


class _Judge:
    """Estimates of changed jobs, each computed once."""

    def __init__(self, spec: JobSpec, gpu_vram_gib: float, gpus: int, fused_attention: bool | None,
                 mode: str) -> None:
        self.spec, self.gpu, self.gpus, self.fused_attention = spec, gpu_vram_gib, gpus, fused_attention
        self.swapped = plan_under(mode, resolve_lowvram(spec, gpu_vram_gib)).blocks_to_swap  # what the job swaps
        self.seen: dict[str, bool] = {}

    def fits(self, changes: list[Change]) -> bool:
        combined: dict[str, dict[str, Any]] = {}
        for change in changes:
            for section, values in change.overrides.items():
                combined.setdefault(section, {}).update(values)
        key = repr(sorted((s, sorted(v.items())) for s, v in combined.items()))
        if key not in self.seen:
            changed = _apply(self.spec, combined)
            result = estimate_as_run(changed, self.gpu, self.gpus, fused_attention=self.fused_attention)
            self.seen[key] = result.verdict == "fits"
        return self.seen[key]

    def fewest_swapped(self, others: list[Change], swap: Change) -> Change:
        """The smallest blocks_to_swap that fits with `others` (it is known to fit at `swap`'s value)."""
        low = self.swapped + 1
        high = swap.overrides["lowvram"]["blocks_to_swap"]

        def at(count: int) -> Change:
            overrides = {s: dict(v) for s, v in swap.overrides.items()}
            overrides["lowvram"]["blocks_to_swap"] = count
            prefix = swap.label[:swap.label.index(SWAP)]  # "lowvram.gradient_checkpointing = true; ", ddp or ""
            return replace(swap, overrides=overrides, label=f"{prefix}{SWAP} ≥ {count}")

        while low < high:  # memory falls monotonically as blocks are swapped
            middle = (low + high) // 2
            if self.fits([*others, at(middle)]):
                high = middle
            else:
                low = middle + 1
        return at(high)


def suggest(spec: JobSpec, gpu_vram_gib: float, gpus: int = 1, fused_attention: bool | None = None,
            mode: str = "single") -> str:
    """The cheapest single change that makes the job fit; else the changes combined, each at its mildest.
    `mode`: the job's on `gpus` GPUs (a changed job is estimated in the mode the trainer would pick for it)."""
    judge = _Judge(spec, gpu_vram_gib, gpus, fused_attention, mode)
    options = candidates(spec, gpu_vram_gib, mode)
    for change in options:
        if judge.fits([change]):
            return (judge.fewest_swapped([], change) if change.setting == SWAP else change).label
    # no single change is enough: accumulate them in cost order (strategies are bundles of the same keys, so they
    # stay out), one option per setting, until the job fits. FSDP swaps no blocks: splitting the base and swapping
    # are two ways, tried one after the other
    chosen: dict[str, Change] = {}
    for left_out in (("lowvram.strategy", DISTRIBUTED), ("lowvram.strategy", SWAP)):
        chosen = {}
        for change in options:
            if change.setting in left_out:
                continue
            chosen[change.setting] = change
            if judge.fits(list(chosen.values())):
                break
        else:
            chosen = {}
        if chosen or not any(change.setting == DISTRIBUTED for change in options):
            break
    if not chosen:
        return NOTHING_FITS
    # relax each setting to its mildest option that still fits, keeping the others; the dearest first, so a
    # cheap change is not dropped in favour of a dear one that covers it
    by_setting: dict[str, list[Change]] = {}
    for change in options:
        by_setting.setdefault(change.setting, []).append(change)
    for setting in sorted(chosen, key=lambda s: -chosen[s].cost):
        others = [c for s, c in chosen.items() if s != setting]
        if judge.fits(others):
            del chosen[setting]
            continue
        for option in by_setting[setting]:
            if judge.fits([*others, option]):
                chosen[setting] = judge.fewest_swapped(others, option) if setting == SWAP else option
                break
    labels: list[str] = []  # a change that needs checkpointing names it too: name it once
    for change in sorted(chosen.values(), key=lambda c: c.cost):
        labels += [part for part in change.label.split("; ") if part not in labels]
    return "; ".join(labels)
