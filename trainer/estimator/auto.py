"""The choices the trainer makes with the memory estimator, on top of `estimate`: the multi-GPU mode
(`choose_mode`, train.distributed = auto) and the low-VRAM plan (`resolve_lowvram`; lowvram.strategy = auto is the
lightest bundle of trainer/memory/strategies.py that fits). Torch-free: the session, trainer/distributed.py and
the app all choose here, so the estimate and the run always agree.
"""

from __future__ import annotations

from dataclasses import replace

from trainer import registry
from trainer.estimator.core import Estimate, estimate
from trainer.estimator.plans import LowVramPlan
from trainer.memory.strategies import CONCRETE, bundle_plan
from trainer.spec import AUTO_TEXT_ENCODER, QUANTISED_PRECISIONS, JobSpec


def choose_mode(spec: JobSpec, world_size: int, gpu_vram_gib: float | None) -> tuple[str, str]:
    """(mode, why) for `world_size` processes: "single", "ddp" or "fsdp".

    auto: fsdp when the memory estimator says one GPU of `gpu_vram_gib` (the job's lowvram.vram_gib wins) cannot
    hold the job even with every low-VRAM technique but block swap on, yet can with the base split over the
    GPUs. Streaming a full base from system RAM in every process costs N copies in RAM and N streams through the
    host; splitting it costs only the gathers. Otherwise ddp: the fastest, as nothing is gathered per block (with
    block swap if the plan says so). A quantised base or blocks swapped by the job itself keep ddp: fsdp refuses
    both (plans.mode_problems).
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
    plan = bundle_plan(spec, "extreme", blocks_to_swap=0)
    whole = estimate(spec, plan, mode="single", gpu_vram_gib=vram)
    if whole.verdict != "will not fit":
        return "ddp", f"auto: the base fits one GPU ({whole.vram_gib:.1f} of {vram:g} GiB without block swap)"
    split = estimate(spec, plan, mode="fsdp", gpus=world_size, gpu_vram_gib=vram)
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


def resolve_lowvram(spec: JobSpec, vram_gib: float | None, gpus: int = 1, ram_gib: float | None = None) -> LowVramPlan:
    """The plan the session runs. `vram_gib`: the GPU's memory (the job's lowvram.vram_gib wins); None: no GPU.
    `gpus`: processes of a multi-GPU run, whose sharding (train.distributed) auto judges the bundles under.
    `ram_gib`: the RAM available (the session and the app pass this machine's): what the job leaves to auto
    (model.text_encoder_precision = "auto", lowvram.swap_from unset) is chosen so the first run fits it (fit_ram)."""
    strategy = spec.lowvram.strategy
    target = spec.lowvram.vram_gib or vram_gib
    if strategy != "auto":
        plan = bundle_plan(spec, strategy, reason="chosen in the job")
    elif target is None:
        plan = bundle_plan(spec, "none", reason="auto: no GPU, nothing to save")
    else:
        plan = choose_auto(spec, target, gpus)
    return fit_ram(spec, plan, target, gpus, ram_gib)


def ram_ladder(spec: JobSpec, plan: LowVramPlan) -> list[tuple[str, LowVramPlan]]:
    """(what changed, plan) for each lighter first run auto may choose, cheapest in quality and speed first: an
    int8 text encoder (its embeddings match bf16's to a cosine of 0.9995, ten times closer than fp8's at the same
    size: bench/bench_text_encoder_quant.py), then swapped blocks on disk as well. Only what the job leaves unset."""
    ladder: list[tuple[str, LowVramPlan]] = []
    if spec.model.text_encoder_precision == "auto" and plan.text_encoder_precision == AUTO_TEXT_ENCODER:
        plan = replace(plan, text_encoder_precision="int8")
        ladder.append(("text encoder int8", plan))
    if spec.lowvram.swap_from is None and plan.blocks_to_swap and plan.swap_from != "disk":
        what = "blocks on disk" + (" and text encoder int8" if ladder else "")
        ladder.append((what, replace(plan, swap_from="disk")))
    return ladder


def fit_ram(spec: JobSpec, plan: LowVramPlan, vram_gib: float | None, gpus: int, ram_gib: float | None) -> LowVramPlan:
    """`plan` lightened along `ram_ladder` to the first step whose first run fits `ram_gib`; as it is when it
    fits already, when no step does (the RAM verdict then names what to change) or with no RAM figure."""
    if ram_gib is None:
        return plan
    ladder = ram_ladder(spec, plan)
    if not ladder:
        return plan
    mode, reason = choose_mode(spec, gpus, vram_gib)
    if mode == "fsdp":  # blocks are not swapped under fsdp; the text encoder still counts
        ladder = [(what, step) for what, step in ladder if step.swap_from == plan.swap_from]

    def need(candidate: LowVramPlan) -> float:
        # the first run: a later one with its embeddings cached needs no more
        return estimate(spec, candidate, mode=mode, gpus=gpus, gpu_vram_gib=vram_gib,
                        mode_reason=reason).first_run_ram_gib

    if need(plan) <= ram_gib:
        return plan
    for what, step in ladder:
        found = need(step)
        if found <= ram_gib:
            return replace(step, reason=f"{plan.reason}; {what}: {found:.1f} GiB of RAM on the first run fits the "
                                        f"{ram_gib:.1f} GiB available".lstrip("; "))
    return plan


def choose_auto(spec: JobSpec, vram_gib: float, gpus: int = 1) -> LowVramPlan:
    """The lightest bundle the estimator says fits in `vram_gib`; inside the swapping bundles the fewest swapped
    blocks that fit. When nothing fits: extreme, and the estimator's verdict says what else to change."""
    most = registry.get_flavour(spec.model.family, spec.model.flavour).max_blocks_to_swap
    mode, reason = choose_mode(spec, gpus, vram_gib)

    def fits(plan: LowVramPlan) -> float | None:
        result = estimate(spec, plan, mode=mode, gpus=gpus, gpu_vram_gib=vram_gib, mode_reason=reason)
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


def estimate_as_run(spec: JobSpec, gpu_vram_gib: float | None = None, gpus: int = 1, *,
                    plan: LowVramPlan | None = None, mode: str | None = None,
                    fused_attention: bool | None = None) -> Estimate:
    """The estimate of what the trainer would run: `mode` (default: train.distributed, auto decided by
    `choose_mode`) and `plan` (default: the plan the session resolves for one GPU, which the mode then adjusts)."""
    if gpu_vram_gib is None:
        gpu_vram_gib = spec.lowvram.vram_gib
    reason = "given"
    if mode is None:
        mode, reason = choose_mode(spec, gpus, gpu_vram_gib)
    if plan is None:
        plan = resolve_lowvram(spec, gpu_vram_gib)
    return estimate(spec, plan, mode=mode, gpus=gpus, gpu_vram_gib=gpu_vram_gib,
                    fused_attention=True if fused_attention is None else fused_attention, mode_reason=reason)
