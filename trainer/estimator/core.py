"""The memory of one job under one given low-VRAM plan and multi-GPU mode, phase by phase, with a verdict per GPU.

Torch-free. Imports only the standard library, `trainer.registry`, `trainer.spec` and the layers of the estimator
below it: the plan (trainer/estimator/plans.py), the shapes (shapes.py), the working memory (activations.py) and
what each GPU holds under FSDP (sharding.py). One estimate takes well under a millisecond; the `auto` strategy
runs a binary search of them (auto.py), the suggestions (suggest.py) a few dozen. `estimate_job` (job.py) picks
the plan and the mode as the run does.

Phases follow the session, one model at a time: the text encoders load (with the VAE) and cache the text
embeddings where `plan.text_encoder_device` says ("gpu": the whole encoder on the GPU; "cpu": in RAM, run on the
CPU; "offload": its layers in RAM, streamed to the GPU through a ring of 2 layer buffers, the rest of it on the
GPU), then are freed; latents are cached with the VAE on the GPU; the VAE is parked in RAM (freed when nothing
is sampled); only then does the transformer load (never beside a text encoder: the loading peak is the larger
of the two, not their sum) and go to the GPU except its swapped blocks, whose frozen weights stay in (pinned)
RAM, or with `swap_from = "disk"` in the block cache file behind a staging ring of `swap_prefetch + 1` host
buffers, and stream through a ring of `swap_prefetch + 1` GPU slots; the LoRA and optimiser are added;
training; validation sampling brings the VAE back. With `data.cache_text_embeddings = "disk"` `ram_gib` assumes
a warm cache (a repeated run); `first_run_ram_gib` is the peak when the embeddings are computed. With `gpus` N >
1 every process runs these phases at once: the VRAM is per GPU, the RAM for all N; under fsdp each GPU holds a
share of the base and gathers blocks as they compute (trainer/estimator/sharding.py has the model).

Every field of the LowVramPlan counts:
- blocks_to_swap: the first n blocks in execution order (double blocks first, as trainer/memory/block_swap.py
  swaps them) stay in RAM; the GPU holds the others plus the ring: min(n, swap_prefetch + 1) slots, each the
  size of the largest swapped block;
- pin_memory: where the swapped weights live (pinned RAM cannot be paged out; the size is the same);
- gradient_checkpointing / checkpointing_interval: every n-th block (and every swapped block) keeps only its
  inputs, 2-4·h bytes per token; the others keep their full activations, ≈60·h; the backward meets one
  recomputed block at a time, beside the activations of the blocks before it;
- cpu_offload_checkpointing: the checkpointed inputs go to RAM, about 2 blocks' worth stay on the GPU;
- optimizer_offload: the optimiser state, fp32 masters of the LoRA weights and a gradient staging copy in RAM
  (trainer/memory/optimizer_memory.py); the weights and their gradients stay on the GPU;
- fused_backward: only about one trainable tensor's gradient alive at a time instead of all of them;
- text_encoder_device, swap_from: see above.

Weights by storage precision (model.base_precision, model.text_encoder_precision): fp32 4 B, bf16/fp16 2 B; fp8
and int8 1 B plus one fp32 scale per output row; int4 and nf4 0.5 B plus one fp32 scale per 64 weights. Only the
Linears inside blocks are quantised, FLUX.1's modulation Linears in model.modulation_precision's format
(trainer.spec.modulation_format); embedders, norm_out and proj_out stay in bf16. A quantised text encoder keeps
its token table in bf16. A quantised Linear is dequantised
to bf16 while it computes: one copy of the largest such Linear (with the 4-bit formats' widened indices:
DEQUANT_BYTES) is the "dequantisation workspace".

Assumed (figures from shared/TECHNIQUES.md, "Activations" and "Optimiser", and measured on the CPU; see the
constants here and in trainer/estimator/activations.py): activations ≈60·h bytes per token per block for FLUX.2 in
16-bit compute (50 for FLUX.1; 90 and 72 in fp32), checkpoint inputs ≈4·h per double block and 2·h per single
block, ≈18·h outside the blocks, the block being recomputed ≈1.05 blocks' activations; tokens = image tokens
(res/16)² + text tokens (512, schnell 256, demo 16), and for edit pairs as many reference tokens again (a sample
with a reference image likewise); attention in a fused kernel needs no s² workspace (otherwise
4·heads·s² bytes per block); LoRA weights and grads in fp32 (peft keeps adapters in fp32); optimiser state per
trainable parameter: AdamW 8 B, AdamW8bit 2 B, Lion8bit 1 B, Adafactor ≈4·(rows + cols) per matrix, Prodigy ≈16 B;
VAE ≈84 M parameters; CUDA context 0.5 GiB; allocator overhead 10 % of the GPU tensors that are not weights; a
process baseline of 2 GiB of RAM.
Every phase's VRAM is the sum of its `parts` (the "training step"'s are its `breakdown`); the training step's
tensor part (without context and overhead) is what trainer/memory_probe.py measures; the demo agrees within a
few per cent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer import registry
from trainer.attention import TRAINS_WITH
from trainer.estimator.activations import (
    INFERENCE_FACTOR,
    SAGE_SAMPLING_BYTES,
    Activations,
    text_encoder_memory,
    training_activations,
)
from trainer.estimator.caches import cached_inputs_bytes, dataset_images
from trainer.estimator.plans import LowVramPlan, mode_problems, plan_under
from trainer.estimator.scoring import clip_scorer_bytes
from trainer.estimator.shapes import (
    QUANTISED,
    WeightLayout,
    adafactor_bytes,
    largest_lora_tensor,
    lora_param_counts,
    text_tokens,
    weight_layout,
)
from trainer.estimator.sharding import gathered_bytes, shard_bytes
from trainer.spec import JobSpec, modulation_format, with_text_encoder_precision

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_OVERHEAD = 0.10
TIGHT_SHARE = 0.90
PROCESS_RAM_GIB = 2.0  # python, torch and the CUDA libraries, before any model
DISK_READ_GBPS = 3.0  # a typical NVMe (PCIe 3 x4 reads ≈3.5 GB/s sequentially), lowvram.disk_read_gbps unset
# A quantised transformer streams in a slice of rows at a time (trainer/memory/quantize.py, sources/single_file.py:
# 16 MiB of fp32 and its temporaries), the heap trimmed once per block: its load peaks at the quantised model plus
# this, not plus a block in bf16. Measured by bench/rehearse.py (CPU, hub shards, fp8): klein base 9B 9.71 GiB
# resident at the load's peak against 9.55 for the loaded model with the process, VAE and caches (+0.16); FLUX.1
# dev 12.06 against 11.92 (+0.14); klein base 9B at 5 blocks deep (bench/rehearse_shallow.py) 2.70 against 2.75.
STREAM_WORKSPACE_GIB = 0.15
CONTEXT = "cuda context"
OVERHEAD = "allocator overhead"

# The dequantisation workspace per weight of the largest quantised Linear (trainer/memory/quantize.py dequantize):
# 8-bit formats convert to bf16 and scale in place (2 bytes); the 4-bit ones hold the packed bytes widened to int32
# for the lookup beside the bf16 weights it gives (2 + 2). Measured on the CPU at klein base 9B's widths, 5 blocks
# deep (bench/rehearse_shallow.py, int4): the first step peaked 0.30 GiB above the estimate with 2 bytes, the
# largest Linear having 151 M weights.
DEQUANT_BYTES = {"fp8": 2.0, "int8": 2.0, "int4": 4.0, "nf4": 4.0}

# Bytes of optimiser state per trainable parameter (adafactor is computed per matrix).
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "lion8bit": 1.0, "prodigy": 16.0}

VAE_PARAMS = 84e6  # both FLUX VAEs; the encoder alone is 41 % (cpu_only.VAE_ENCODER_SHARE)
VAE_PEAK_BYTES_PER_PIXEL = 400.0  # activations of one image through the VAE (slicing: one image at a time), 16-bit
# sample.preview_decoder: a diffusers AutoencoderTiny (encoder and decoder, both loaded), e.g. taef1: 2.46 M
TINY_DECODER_PARAMS = 2.5e6

PHASES = ("loading", "caching text embeddings", "caching latents", "training step", "validation sampling", "saving")


@dataclass(frozen=True)
class PhaseMemory:
    vram_gib: float  # per GPU: the sum of `parts`
    ram_gib: float  # all processes together
    parts: dict[str, float] = field(default_factory=dict)  # GiB on the GPU by part; empty when the phase does not run


@dataclass
class Estimate:
    vram_gib: float
    ram_gib: float
    phases: dict[str, PhaseMemory]
    breakdown: dict[str, float]  # the training step on the GPU, GiB; sums to that phase's VRAM
    verdict: str | None = None  # "fits", "tight", "will not fit"; None without a GPU size
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)
    ram_breakdown: dict[str, float] = field(default_factory=dict)  # system RAM during the training step, GiB
    components: dict[str, float] = field(default_factory=dict)  # whole models at their precision, GiB
    plan: str = ""  # the low-VRAM plan the estimate assumed, described
    mode: str = "single"  # "single", "ddp" or "fsdp": how the GPUs share the job
    gpus: int = 1
    mode_reason: str = ""
    first_run_ram_gib: float = 0.0  # the peak RAM when the text embeddings are computed (ram_gib: this job as set)
    block_cache_gib: float = 0.0  # the block cache file on disk (lowvram.swap_from = "disk")

    def to_json(self) -> dict[str, Any]:
        def rounded(values: dict[str, float]) -> dict[str, float]:
            return {name: round(value, 4) for name, value in values.items()}

        return {
            "vram_gib": round(self.vram_gib, 3),
            "ram_gib": round(self.ram_gib, 3),
            "first_run_ram_gib": round(self.first_run_ram_gib, 3),
            "block_cache_gib": round(self.block_cache_gib, 3),
            # parts of zero are left out: a bar shows what is there
            "phases": {name: {"vram_gib": round(p.vram_gib, 3), "ram_gib": round(p.ram_gib, 3),
                              "parts": rounded({k: v for k, v in p.parts.items() if v > 0})}
                       for name, p in self.phases.items()},
            "breakdown": rounded(self.breakdown),
            "ram_breakdown": rounded(self.ram_breakdown),
            "components": rounded(self.components),
            "distributed": {"mode": self.mode, "gpus": self.gpus, "reason": self.mode_reason},
            "plan": self.plan,
            "verdict": self.verdict,
            "suggestion": self.suggestion,
            "notes": list(self.notes),
        }


def _gpu_phase(weights: dict[str, float], dynamic: dict[str, float], ram: float) -> PhaseMemory:
    """A phase from its GPU tensors in bytes by part: weights are allocated once, at their size; the allocator
    overhead applies to everything else; the CUDA context is always there."""
    parts = {name: value / GIB for name, value in (weights | dynamic).items()}
    parts[CONTEXT] = CUDA_CONTEXT_GIB
    parts[OVERHEAD] = sum(dynamic.values()) * ALLOCATOR_OVERHEAD / GIB
    return PhaseMemory(sum(parts.values()), ram, parts)


@dataclass(frozen=True)
class _Job:
    """What every part of an estimate reads: the job, its flavour, the plan under the mode, and the token counts."""

    spec: JobSpec
    f: registry.Flavour
    plan: LowVramPlan
    mode: str
    gpus: int
    layout: WeightLayout
    compute_elem: int  # bytes of the compute dtype
    vae_elem: int  # the VAE loads in the compute dtype, never quantised
    resolution: int
    image_tokens: int
    reference_tokens: int
    images: int | None = None  # in the dataset folders (caches.dataset_images), listed once per estimate

    @property
    def precision(self) -> str:
        return self.spec.model.base_precision

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.reference_tokens + text_tokens(self.f)

    @property
    def text_loaded(self) -> bool:
        """The text encoders load (not on a warm disk cache of the embeddings)."""
        return self.spec.data.cache_text_embeddings != "disk"

    @property
    def vae_bytes(self) -> float:
        return 0.0 if self.f.is_demo else VAE_PARAMS * self.vae_elem

    @property
    def swapped(self) -> tuple[float, ...]:
        """Bytes of each swapped block, in execution order."""
        return self.layout.blocks[:min(self.plan.blocks_to_swap, self.f.total_blocks)]

    @property
    def on_disk(self) -> bool:
        """The swapped blocks wait in the block cache file (lowvram.swap_from = "disk"; never under fsdp)."""
        return self.plan.swap_from == "disk" and bool(self.swapped) and self.mode != "fsdp"


@dataclass(frozen=True)
class _Step:
    """The training step's GPU tensors in bytes by part, and what of them the sampling phase keeps."""

    dynamic: dict[str, float]
    kept_for_sampling: dict[str, float]
    between_steps: dict[str, float]  # what outlives a step: the LoRA, its optimiser state and EMA (saving)
    optimizer_ram: float  # offloaded optimiser state, fp32 masters and gradient copies
    activations: Activations
    modules: int
    lora_params: int


def estimate(spec: JobSpec, plan: LowVramPlan, *, mode: str = "single", gpus: int = 1,
             gpu_vram_gib: float | None = None, fused_attention: bool = True, mode_reason: str = "given") -> Estimate:
    """VRAM per GPU and RAM per phase of `spec` on `gpus` GPUs in `mode` ("single", "ddp" or "fsdp") under `plan`,
    with a verdict against `gpu_vram_gib` (per GPU; default: the job's lowvram.vram_gib). The RAM is for all the
    processes together. Under fsdp block swap is off, as in the run (plans.plan_under). The sum of named parts:
    the base's weights, the training step, the text encoders, the VAE and sampling, the RAM of each phase.

    `fused_attention`: whether attention runs in a fused kernel (no s² workspace); torch's SDPA picks a flash
    kernel on CUDA and on the CPU (the probe measured no s² tensor on the demo).
    """
    spec = with_text_encoder_precision(spec, plan.text_encoder_precision)  # auto: what the plan chose
    job = _job(spec, plan_under(mode, plan), mode, gpus)
    weights, swapped_ram = _base_weights(job)
    step = _training_step(job, fused_attention)
    train_ram = _training_ram(job, swapped_ram, step)
    phases = _phases(job, weights, step, train_ram)
    phases = {name: PhaseMemory(p.vram_gib, p.ram_gib * gpus / GIB, p.parts) for name, p in phases.items()}
    loads = _loads(job)
    first_run = max(sum(train_ram.values()), loads.loading(True), loads.caching_text(True)) * gpus / GIB
    first_run = max(first_run, max(p.ram_gib for p in phases.values()))
    te_whole = text_encoder_memory(job.f, spec, job.plan.text_encoder_device)[0]
    components = {
        f"transformer ({job.precision})": job.layout.total / GIB,
        f"text encoder ({job.f.text_encoder_label}, {spec.model.text_encoder_precision})": te_whole / GIB,
        "vae": job.vae_bytes / GIB,
    }
    result = Estimate(
        vram_gib=max(p.vram_gib for p in phases.values()),
        ram_gib=max(p.ram_gib for p in phases.values()),
        phases=phases, breakdown=dict(phases["training step"].parts),
        notes=_notes(job, step, weights, mode_reason, first_run),
        ram_breakdown={name: value * gpus / GIB for name, value in train_ram.items()},
        components=components, plan=job.plan.describe(), mode=mode, gpus=gpus, mode_reason=mode_reason,
        first_run_ram_gib=first_run, block_cache_gib=sum(job.swapped) / GIB if job.on_disk else 0.0,
    )
    vram = spec.lowvram.vram_gib if gpu_vram_gib is None else gpu_vram_gib
    if vram is not None:
        result.verdict = verdict(result.vram_gib, vram)
    return result


def _job(spec: JobSpec, plan: LowVramPlan, mode: str, gpus: int) -> _Job:
    f = registry.get_flavour(spec.model.family, spec.model.flavour)
    precision = spec.model.base_precision
    resolution = max(spec.data.every_resolution())
    image_tokens = (resolution // 16) ** 2
    modulation = modulation_format(spec.model.family, precision, spec.model.modulation_precision)
    return _Job(spec, f, plan, mode, gpus, weight_layout(f, precision, modulation),
                compute_elem=4 if (spec.train.mixed_precision == "no" and precision == "fp32") else 2,
                vae_elem=4 if precision == "fp32" else 2, resolution=resolution, image_tokens=image_tokens,
                reference_tokens=_reference_tokens(spec, image_tokens), images=dataset_images(spec))


def _base_weights(job: _Job) -> tuple[dict[str, float], float]:
    """(the frozen transformer's bytes on the GPU by part, the swapped blocks' bytes in RAM). One GPU or ddp:
    resident blocks and the rest, swapped blocks in RAM behind a ring; fsdp: a 1/N share of everything, plus what
    is gathered while computing."""
    layout, precision = job.layout, job.precision
    swapped_count = min(job.plan.blocks_to_swap, job.f.total_blocks)
    swapped = layout.blocks[:swapped_count]
    if job.mode == "fsdp":
        shares = {f"base weights on GPU ({precision}, 1/{job.gpus} shard)": shard_bytes(layout, job.gpus),
                  "gathered weights (FSDP: non-block weights + 2 neighbouring blocks)": gathered_bytes(layout)}
        return shares, sum(swapped)
    ring_slots = min(swapped_count, job.plan.swap_prefetch + 1)
    return {f"base weights on GPU ({precision})": layout.other + sum(layout.blocks[swapped_count:]),
            f"swap ring ({ring_slots} x largest swapped block)": ring_slots * max(swapped, default=0.0)}, sum(swapped)


def _checkpointing_label(job: _Job, act: Activations) -> str:
    plan, total = job.plan, job.f.total_blocks
    offloaded = ", inputs offloaded)" if plan.cpu_offload_checkpointing else ")"
    if act.checkpointed == total:
        return " (checkpointed" + offloaded
    if act.checkpointed:
        every = plan.checkpointing_interval
        return (f" ({act.checkpointed} of {total} blocks checkpointed"
                + (f", every {every}" if plan.gradient_checkpointing and every > 1 else "") + offloaded)
    return ""


def _training_step(job: _Job, fused_attention: bool) -> _Step:
    """The LoRA, its gradients, the optimiser state, the activations and the dequantisation workspace."""
    spec, f, plan = job.spec, job.f, job.plan
    lora = spec.lora
    modules, lora_params = lora_param_counts(f, lora.targets, lora.rank, lora.type)
    lora_bytes = lora_params * 4.0
    if plan.fused_backward:
        grad_bytes = largest_lora_tensor(f, lora.targets, lora.rank, lora.type) * 4.0
    else:
        grad_bytes = lora_params * 4.0
    if spec.train.optimizer == "adafactor":
        optimizer_bytes = adafactor_bytes(f, lora.targets, lora.rank, lora.type)
    else:
        optimizer_bytes = lora_params * OPTIMIZER_BYTES[spec.train.optimizer]
    optimizer_gpu = 0.0 if plan.optimizer_offload else optimizer_bytes
    act = training_activations(f, plan, job.tokens, spec.train.batch_size, job.compute_elem, fused_attention,
                               TRAINS_WITH[spec.advanced.attention])
    dequant = DEQUANT_BYTES.get(job.precision, 0.0) * job.layout.largest_linear_params
    optimizer_label = f"optimizer state ({spec.train.optimizer}" + (
        ", offloaded to RAM)" if plan.optimizer_offload else ")")
    ema_gpu = _ema_bytes(spec, lora_params, "gpu")
    ema = {"lora EMA (fp32)": ema_gpu} if ema_gpu else {}
    between = {"lora weights (fp32)": lora_bytes, optimizer_label: optimizer_gpu, **ema}
    kept = between | {"dequantisation workspace": dequant}
    dynamic = {
        "lora weights (fp32)": lora_bytes,
        **ema,
        "lora grads (fp32" + (", fused backward: one tensor at a time)" if plan.fused_backward else ")"): grad_bytes,
        optimizer_label: optimizer_gpu,
        "activations" + _checkpointing_label(job, act): act.gpu,
        "attention workspace": act.attention,
        "dequantisation workspace": dequant,
    }
    optimizer_ram = optimizer_bytes + 2 * lora_bytes if plan.optimizer_offload else 0.0  # + masters, grad copies
    return _Step(dynamic, kept, between, optimizer_ram, act, modules, lora_params)


def _ema_bytes(spec: JobSpec, lora_params: int, where: str) -> float:
    """train.ema_decay: one fp32 copy of the LoRA, on the GPU or (ema_device = cpu) in system RAM."""
    if spec.train.ema_decay is None or (spec.train.ema_device or "gpu") != where:
        return 0.0
    return lora_params * 4.0


def _training_ram(job: _Job, swapped_ram: float, step: _Step) -> dict[str, float]:
    """System RAM per process during the training step, by part."""
    sampled = bool(job.spec.sample.prompts)
    swapped_label, swapped_ram = _swapped_ram(job.plan, job.swapped, job.precision, job.on_disk)
    return {
        "process (python, torch, CUDA libraries)": PROCESS_RAM_GIB * GIB,
        swapped_label: swapped_ram,
        "vae (parked for sampling)": job.vae_bytes if sampled else 0.0,
        "preview decoder (parked for sampling)": _preview_decoder_bytes(job),
        "optimizer state + fp32 lora masters and grads (offloaded)": step.optimizer_ram,
        "checkpoint inputs (offloaded)": step.activations.offloaded,
        "cached latents and embeddings (in memory)": _caches(job),
        "lora EMA (fp32, ema_device = cpu)": _ema_bytes(job.spec, step.lora_params, "cpu"),
    }


def _sampling_work(job: _Job) -> float:
    """Bytes of the sampling's working memory: the denoiser's no-grad forward (cond and uncond in one batch under
    CFG), then the VAE decode, then the CLIP scorer if one is set; one after the other, so the largest counts."""
    spec, f = job.spec, job.f
    sample_res = spec.sample.resolution or f.sample_resolution
    # a sample rendered from a reference image carries it at the sample's own size (trainer/data/pairs.py)
    has_pairs = any(entry.conditioning for entry in spec.data.datasets)
    sample_references = f.reference_images and bool(spec.sample.reference_images or has_pairs)
    sample_tokens = (sample_res // 16) ** 2 * (2 if sample_references else 1) + text_tokens(f)
    cfg = 2 if (f.guidance == "cfg" and (spec.sample.guidance or f.sample_guidance) > 1.0) else 1
    denoise = INFERENCE_FACTOR[job.compute_elem] * f.hidden_size * sample_tokens * cfg
    if spec.advanced.attention == "sage":
        denoise += SAGE_SAMPLING_BYTES * f.hidden_size * sample_tokens * cfg
    # Live previews (sample.preview_every) decode between two denoising steps, at most PREVIEW_SIDE px, by the VAE
    # or a smaller decoder: never more than the final decode, so they add no working memory here.
    decode = 0.0 if f.is_demo else VAE_PEAK_BYTES_PER_PIXEL * sample_res**2 * job.vae_elem / 2
    return max(denoise, decode, clip_scorer_bytes(spec.sample.clip_score_model))


def _preview_decoder_bytes(job: _Job) -> float:
    """sample.preview_decoder: the tiny autoencoder beside the VAE while sampling (in system RAM otherwise)."""
    sample = job.spec.sample
    used = sample.prompts and sample.preview_every and sample.preview_decoder and not job.f.is_demo
    return TINY_DECODER_PARAMS * job.vae_elem if used else 0.0


def _phases(job: _Job, weights: dict[str, float], step: _Step, train_ram: dict[str, float]) -> dict[str, PhaseMemory]:
    """Every phase in the session's order; RAM per process, one model at a time (`_Loads`; each process loads the
    whole pipeline before it moves or shards it). The text encoders are skipped on a warm disk cache."""
    spec, f, plan = job.spec, job.f, job.plan
    te_whole, te_gpu, te_gpu_weights, te_ram = text_encoder_memory(f, spec, plan.text_encoder_device)
    te_label = f"{f.text_encoder_label}, {spec.model.text_encoder_precision}, {plan.text_encoder_device}"
    vae_bytes = job.vae_bytes
    loads = _loads(job)
    vae_work = 0.0 if f.is_demo else VAE_PEAK_BYTES_PER_PIXEL * job.resolution**2 * job.vae_elem / 2
    ram_step = sum(train_ram.values())
    no_gpu: dict[str, float] = {}
    loaded = job.text_loaded
    text_weights = {f"text encoder weights ({te_label})": te_gpu_weights} if loaded else no_gpu
    text_work = {"text encoder working memory": te_gpu - te_gpu_weights} if loaded else no_gpu
    tiny = _preview_decoder_bytes(job)
    previews = {"preview decoder (tiny autoencoder)": tiny} if tiny else no_gpu
    sampling = (_gpu_phase(weights | {"vae": vae_bytes} | previews,
                           step.kept_for_sampling | {"sampling working memory (denoiser, VAE decode, CLIP score)":
                                                     _sampling_work(job)},
                           ram_step - train_ram["vae (parked for sampling)"] - tiny - step.activations.offloaded)
                if spec.sample.prompts else PhaseMemory(0.0, 0.0))
    return {
        "loading": _gpu_phase(no_gpu, no_gpu, loads.loading(loaded)),
        "caching text embeddings": _gpu_phase(text_weights, text_work, loads.caching_text(loaded)),
        "caching latents": _gpu_phase({"vae": vae_bytes}, {"vae working memory (one image)": vae_work},
                                      loads.caching_latents()),
        "training step": _gpu_phase(weights, step.dynamic, ram_step),
        "validation sampling": sampling,
        # the LoRA written out between steps: no activations, no dequantisation (files are written from the host)
        "saving": _gpu_phase(weights, step.between_steps, ram_step - step.activations.offloaded),
    }


def _notes(job: _Job, step: _Step, weights: dict[str, float], mode_reason: str, first_run: float) -> list[str]:
    """What the figures assume, in words; `first_run`: the first run's RAM, GiB."""
    spec, f, plan, gpus = job.spec, job.f, job.plan, job.gpus
    references = f" + {job.reference_tokens} reference" if job.reference_tokens else ""
    notes = [f"{step.modules} {spec.lora.type} modules, {step.lora_params:,} trainable parameters; {job.tokens} "
             f"tokens per sample ({job.image_tokens} image{references} + {text_tokens(f)} text) at "
             f"{job.resolution} px", f"plan: {plan.describe()}"]
    if job.reference_tokens:
        notes.append("edit pairs: each target's reference image is encoded beside it and appended to its tokens, so "
                     "the transformer sees about twice the image tokens")
    if gpus > 1 or job.mode != "single":
        notes += _distributed_notes(spec, job.mode, mode_reason, gpus, weights)
    if not f.is_demo:
        per_caption = text_tokens(f) * f.joint_attention_dim * job.compute_elem / 1024**2
        counted = f"{job.images} images in the datasets" if job.images is not None else \
            f"{registry.TEXT_ENCODE_BATCH} images assumed: no dataset folder yet"
        notes.append(f"each caption's cached text embedding takes {per_caption:.1f} MiB of RAM through training "
                     f"(counted for {counted})")
    te_whole, te_gpu, te_gpu_weights, _ = text_encoder_memory(f, spec, plan.text_encoder_device)
    if not job.text_loaded and te_whole:
        cold = _gpu_phase({"weights": te_gpu_weights}, {"work": te_gpu - te_gpu_weights}, 0.0)
        notes.append(f"assumes the text embeddings are already on disk; a first run caches them with the text encoder "
                     f"({plan.text_encoder_device}): {cold.vram_gib:.1f} GiB VRAM, {first_run:.1f} GiB RAM")
    if job.on_disk:
        swapped = sum(job.swapped)
        notes.append(_disk_note(spec, len(job.swapped), swapped - _swapped_ram(plan, job.swapped, job.precision,
                                                                                True)[1], swapped))
    return notes


def _swapped_ram(plan: LowVramPlan, swapped: tuple[float, ...], precision: str, on_disk: bool) -> tuple[str, float]:
    """What the swapped blocks hold in RAM during training: all of them (pinned), or with blocks on disk the
    staging ring of `swap_prefetch + 1` host buffers the size of the largest."""
    if on_disk:
        slots = min(len(swapped), plan.swap_prefetch + 1)
        return (f"block staging ring ({slots} x largest swapped block, pinned; {len(swapped)} blocks wait on disk)",
                slots * max(swapped))
    return (f"swapped base weights ({len(swapped)} blocks, {precision}" + (", pinned)" if plan.pin_memory else ")"),
            sum(swapped))


def _transformer_load(layout: WeightLayout, precision: str, on_disk: tuple[float, ...]) -> float:
    """The transformer's RAM peak while it streams in: quantised a slice of rows at a time (STREAM_WORKSPACE_GIB);
    the swapped blocks `on_disk` go to the block cache as soon as each is complete, so at most one is in RAM."""
    peak = layout.total + (STREAM_WORKSPACE_GIB * GIB if precision in QUANTISED else 0.0)
    return peak - sum(on_disk) + max(on_disk, default=0.0)


@dataclass(frozen=True)
class _Loads:
    """RAM (bytes, one process) of the phases before training, which run in sequence (trainer/session.py): the
    text encoders load with the VAE and cache the embeddings, then are freed; the VAE caches the latents and is
    parked (or freed); the transformer loads last. Never a text encoder and the transformer at once."""

    process: float
    vae: float
    parked_vae: float  # the VAE in RAM while the transformer loads: 0 when nothing is sampled
    caches: float
    te_whole: float
    te_caching: float  # the text encoders' RAM while they run (0 on the GPU)
    transformer: float  # the transformer's peak while it streams in

    def loading(self, text_encoders: bool) -> float:
        encoders = self.process + self.vae + self.te_whole if text_encoders else 0.0
        return max(encoders, self.process + self.parked_vae + self.caches + self.transformer)

    def caching_text(self, text_encoders: bool) -> float:
        return self.process + self.vae + (self.te_caching if text_encoders else 0.0)

    def caching_latents(self) -> float:
        return self.process + self.vae + self.caches


def _disk_note(spec: JobSpec, swapped: int, saved: float, cached: float) -> str:
    """What blocks on disk save and may cost: each swapped block is read in forward and again when it is
    recomputed in backward; the read-ahead hides this where the GPU computes a block for longer than the disk
    takes to read the next one."""
    speed = spec.lowvram.disk_read_gbps or DISK_READ_GBPS
    seconds = 2 * cached / (speed * 1e9)
    return (f"blocks on disk: {swapped} swapped blocks ({cached / GIB:.1f} GiB) in a block cache file beside the "
            f"latents save {saved / GIB:.1f} GiB of RAM; at {speed:g} GB/s (lowvram.disk_read_gbps) reading them "
            f"twice per micro-batch takes {seconds:.1f} s, the most a step can slow down where computing cannot "
            "hide it (the OS page cache serves them faster while RAM is free)")


def _caches(job: _Job) -> float:
    return cached_inputs_bytes(job.spec, job.f, job.compute_elem, job.images)


def _loads(job: _Job) -> _Loads:
    """The phases before training, in sequence, for `job` (bytes, one process)."""
    te_whole, _, _, te_ram = text_encoder_memory(job.f, job.spec, job.plan.text_encoder_device)
    sampled = bool(job.spec.sample.prompts)
    transformer = _transformer_load(job.layout, job.precision, job.swapped if job.on_disk else ())
    return _Loads(PROCESS_RAM_GIB * GIB, job.vae_bytes, job.vae_bytes if sampled else 0.0, _caches(job),
                  te_whole, te_ram, transformer)


def loading_parts(spec: JobSpec, plan: LowVramPlan) -> dict[str, float]:
    """GiB of RAM of one process at the peak of each of the two loads, which run apart (trainer/session.py): the
    pipeline with its text encoders and VAE ("text encoders"; the VAE alone on a warm text cache), then the
    transformer beside the parked VAE and the caches ("transformer"). The "loading" phase is the larger."""
    job = _job(with_text_encoder_precision(spec, plan.text_encoder_precision), plan, "single", 1)
    loads = _loads(job)
    encoders = loads.process + loads.vae + (loads.te_whole if job.text_loaded else 0.0)
    return {"text encoders": encoders / GIB,
            "transformer": (loads.process + loads.parked_vae + loads.caches + loads.transformer) / GIB}


def _reference_tokens(spec: JobSpec, image_tokens: int) -> int:
    """Reference-image tokens beside the largest sample's image tokens: an edit pair's reference is cut to its
    target's bucket (strict) or to one of the same pixel area (loose), so it adds as many tokens as the target;
    0 without edit pairs. `image_tokens`: those of the job's largest resolution."""
    largest = 0
    for entry in spec.data.datasets:
        if entry.conditioning:
            own = (max(spec.data.resolutions(entry)) // 16) ** 2
            largest = max(largest, 2 * own)  # target and reference
    return max(0, largest - image_tokens)


def _distributed_notes(spec: JobSpec, mode: str, reason: str, gpus: int, weights: dict[str, float]) -> list[str]:
    """What the mode means for this job, in words, and what the run would refuse."""
    each = f"the activations of its own micro-batch of {spec.train.batch_size}; RAM is for all {gpus} processes"
    if mode == "fsdp":
        shard, gathered = (value / GIB for value in weights.values())
        lines = [f"fsdp on {gpus} GPUs ({reason}): each GPU keeps 1/{gpus} of the base ({shard:.1f} GiB) and gathers "
                 f"the non-block weights and two blocks at a time ({gathered:.1f} GiB); the LoRA and optimiser whole "
                 f"on every GPU, {each}, each loading the whole pipeline before it is sharded; no block swap"]
    else:
        lines = [f"{mode} on {gpus} GPUs ({reason}): every GPU holds the whole base, LoRA and optimiser, and "
                 f"{each}, each loading the whole pipeline"]
    return lines + [f"the run refuses this: {problem}" for problem in mode_problems(spec, mode)]


def verdict(need_gib: float, gpu_vram_gib: float) -> str:
    if need_gib > gpu_vram_gib:
        return "will not fit"
    return "tight" if need_gib > TIGHT_SHARE * gpu_vram_gib else "fits"
