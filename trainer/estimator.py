"""Torch-free prediction of the VRAM and system RAM a job needs, phase by phase, with a verdict for one GPU.

Imports only the standard library, `trainer.registry`, `trainer.spec`, `trainer.memory.strategies` and the
shapes in trainer/estimator_shapes.py. One estimate takes well under a millisecond; `auto` runs a binary search
of them, the suggestions (trainer/estimator_suggest.py) a few dozen.

Phases follow the session: the pipeline is loaded to system RAM; text embeddings are cached with the text
encoders where `plan.text_encoder_device` says ("gpu": the whole encoder on the GPU; "cpu": in RAM, run on the
CPU; "offload": its layers in RAM, streamed to the GPU through a ring of 2 layer buffers, the rest of it on
the GPU); the text encoders
are freed; latents are cached with the VAE on the GPU; the VAE is parked in RAM (freed when nothing is
sampled); the transformer goes to the GPU except its swapped blocks, whose frozen weights stay in (pinned) RAM
and stream through a ring of `swap_prefetch + 1` GPU slots; the LoRA and optimiser are added; training;
validation sampling brings the VAE back. With `data.cache_text_embeddings = "disk"` the estimate assumes a
warm cache (a repeated run); what a first run needs is in `Estimate.notes`.

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
- text_encoder_device: see above.

Weights by storage precision (model.base_precision): fp32 4 B, bf16/fp16 2 B; fp8 and int8 1 B plus one fp32
scale per output row; int4 and nf4 0.5 B plus one fp32 scale per 64 weights. Only the Linears inside blocks are
quantised; modulation Linears, embedders, norm_out and proj_out stay in bf16. A quantised Linear is dequantised
to bf16 while it computes: one copy of the largest such Linear is the "dequantisation workspace".

Assumed (figures from shared/TECHNIQUES.md, "Activations" and "Optimiser", and measured on the CPU; see the
constants): activations ≈60·h bytes per token per block for FLUX.2 in 16-bit compute (50 for FLUX.1; 90 and 72 in
fp32), checkpoint inputs ≈4·h per double block and 2·h per single block, ≈18·h outside the blocks, the block being
recomputed ≈1.05 blocks' activations; tokens = image tokens (res/16)² + text tokens (512, schnell 256, demo 64);
attention in a fused kernel needs no s² workspace (otherwise 4·heads·s² bytes per block); LoRA weights and grads
in fp32 (peft keeps adapters in fp32); optimiser state per trainable parameter: AdamW 8 B, AdamW8bit 2 B,
Lion8bit 1 B, Adafactor ≈4·(rows + cols) per matrix, Prodigy ≈16 B; VAE ≈84 M parameters; CUDA context 0.5 GiB;
allocator overhead 10 % of the GPU tensors that are not weights; a process baseline of 2 GiB of RAM.
The "training step" VRAM is the sum of `breakdown`; its tensor part (without context and overhead) is what
trainer/memory_probe.py measures; the demo agrees within a few per cent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer import registry
from trainer.estimator_shapes import (
    BYTES,
    QUANTISED,
    TEXT_ENCODERS,
    Linear,
    adafactor_bytes,
    largest_lora_tensor,
    lora_param_counts,
    text_tokens,
    transformer_linears,
    transformer_params,
    weight_layout,
)
from trainer.memory.strategies import LowVramPlan, resolve_lowvram
from trainer.spec import JobSpec

__all__ = ["BYTES", "Estimate", "Linear", "PhaseMemory", "estimate", "lora_param_counts", "transformer_linears",
           "transformer_params", "verdict", "weight_layout"]

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_OVERHEAD = 0.10
TIGHT_SHARE = 0.90
PROCESS_RAM_GIB = 2.0  # python, torch and the CUDA libraries, before any model
CACHES_RAM_GIB = 0.1  # latents and embeddings cached in memory for a small dataset (see the note per caption)

# Activation bytes per token per block per unit of hidden size h, saved for backward. Measured with
# trainer/memory_probe.py's tracker on the CPU: a FLUX.2 block at h = 1024 in fp32 keeps ≈86 bytes (double 85,
# single 88), the demo's fp32 blocks 99 (FLUX.2) and 79 (FLUX.1); under bf16 autocast a block keeps ≈0.7 of
# its fp32 bytes, not half (RMSNorm upcasts to fp32, fp32 LoRA weights are cast copies), ≈60 at h = 3072 and on
# the demo. TECHNIQUES' ≈50·h is in the same range; its FLUX.1 figure (≈40 GB at 1024 px) implies ≈45.
ACTIVATION_FACTOR = {"flux2": 60.0, "flux1": 50.0}  # bf16/fp16 compute (autocast or a 16-bit base)
FP32_ACTIVATION_FACTOR = {"flux2": 90.0, "flux1": 72.0}  # fp32 compute (mixed_precision "no", fp32 base)
# Outside the blocks (embedders, norm_out, proj_out, the loss and the first gradients of the backward): ≈25·h
# bytes per token in fp32 at h = 1024, ×0.7 under autocast.
NON_BLOCK_FACTOR = {2: 18.0, 4: 25.0}  # by compute element size
# The peak of a no-grad forward (sampling) per token per h: 86 bytes in fp32 at h = 1024 (CPU, FLUX.2), the
# largest block's transients; half in 16-bit.
INFERENCE_FACTOR = {2: 45.0, 4: 86.0}  # by compute element size
# A checkpointed block keeps its inputs: measured ≈3.8·h per token for a double block (two streams) and 2·h for a
# single block, in 16-bit; twice that in fp32.
CHECKPOINT_FACTOR = {"double": 4.0, "single": 2.0}
# The block being recomputed during backward, with its gradient temporaries, in units of one block's activations:
# 1.04 for FLUX.2 double blocks at h = 1024 (fp32, CPU), 1.07-1.17 on the demo.
RECOMPUTE_FACTOR = 1.05
OFFLOAD_KEPT_BLOCKS = 2  # checkpoint inputs on the GPU with cpu_offload_checkpointing: in flight both ways
TEXT_ENCODER_RING = 2  # layer buffers of a streamed ("offload") text encoder

# Bytes of optimiser state per trainable parameter (adafactor is computed per matrix).
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "lion8bit": 1.0, "prodigy": 16.0}

VAE_PARAMS = 84e6  # both FLUX VAEs; the encoder alone is about a third
VAE_PEAK_BYTES_PER_PIXEL = 400.0  # activations of one image through the VAE (slicing: one image at a time), 16-bit

PHASES = ("loading", "caching text embeddings", "caching latents", "training step", "validation sampling")


@dataclass(frozen=True)
class PhaseMemory:
    vram_gib: float
    ram_gib: float


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

    def to_json(self) -> dict[str, Any]:
        def rounded(values: dict[str, float]) -> dict[str, float]:
            return {name: round(value, 4) for name, value in values.items()}

        return {
            "vram_gib": round(self.vram_gib, 3),
            "ram_gib": round(self.ram_gib, 3),
            "phases": {name: {"vram_gib": round(p.vram_gib, 3), "ram_gib": round(p.ram_gib, 3)}
                       for name, p in self.phases.items()},
            "breakdown": rounded(self.breakdown),
            "ram_breakdown": rounded(self.ram_breakdown),
            "components": rounded(self.components),
            "plan": self.plan,
            "verdict": self.verdict,
            "suggestion": self.suggestion,
            "notes": list(self.notes),
        }


def _resolutions(spec: JobSpec) -> list[int]:
    values = [spec.data.resolution] if isinstance(spec.data.resolution, int) else list(spec.data.resolution)
    for entry in spec.data.datasets:
        if entry.resolution:
            values += [entry.resolution] if isinstance(entry.resolution, int) else list(entry.resolution)
    return values


@dataclass(frozen=True)
class _Activations:
    gpu: float  # saved for backward on the GPU, with the block being recomputed
    attention: float
    offloaded: float  # checkpoint inputs in RAM
    checkpointed: int  # blocks


def _training_activations(f: registry.Flavour, plan: LowVramPlan, tokens: int, batch: int, elem: int,
                          fused_attention: bool) -> _Activations:
    """Bytes of activations for one forward+backward under the plan's checkpointing and swap."""
    total = f.total_blocks
    swapped = min(plan.blocks_to_swap, total)
    every = plan.checkpointing_interval if plan.gradient_checkpointing else 0
    # swapped blocks (the first ones) are always checkpointed: their weights have left the ring by the backward
    is_checkpointed = [bool(every and i % every == 0) or i < swapped for i in range(total)]
    checkpointed = sum(is_checkpointed)
    full_blocks = total - checkpointed
    per_token = f.hidden_size * tokens * batch
    one_block = (FP32_ACTIVATION_FACTOR if elem == 4 else ACTIVATION_FACTOR)[f.family] * per_token
    inputs = [CHECKPOINT_FACTOR["double" if i < f.double_blocks else "single"] * per_token * elem / 2
              for i in range(total)]
    # the backward runs from the last block to the first: at block i everything saved by the blocks before it
    # is alive, plus block i's own full activations, or its recomputation when it was checkpointed (the later
    # blocks' activations are already freed); the peak is the largest of these
    saved = full_before = 0.0
    kept_inputs: list[float] = []  # inputs of the checkpointed blocks before i that are on the GPU
    for index in range(total):
        alive = full_before + sum(kept_inputs)
        if is_checkpointed[index]:
            saved = max(saved, alive + RECOMPUTE_FACTOR * one_block)
            kept_inputs.append(inputs[index])
            if plan.cpu_offload_checkpointing:
                kept_inputs = kept_inputs[-OFFLOAD_KEPT_BLOCKS:]  # the rest wait in RAM
        else:
            full_before += one_block
            saved = max(saved, alive + one_block)
    saved += NON_BLOCK_FACTOR[elem] * per_token
    # offloaded: every checkpointed block's input passes through pinned RAM
    offloaded = sum(x for x, c in zip(inputs, is_checkpointed, strict=True) if c) if plan.cpu_offload_checkpointing \
        else 0.0
    # without a fused kernel the attention probabilities of every non-checkpointed block are saved for backward
    per_block = 0.0 if fused_attention else 4.0 * f.num_heads * tokens * tokens * batch * elem / 2
    attention = per_block * (full_blocks + (1 if checkpointed else 0))
    return _Activations(saved, attention, offloaded, checkpointed)


def _text_encoder(f: registry.Flavour, spec: JobSpec, device: str) -> tuple[float, float, float, float]:
    """(whole encoder bytes, GPU bytes while caching, of which weights, RAM bytes while caching)."""
    shape = None if f.is_demo else TEXT_ENCODERS.get(f.text_encoder_label)
    if shape is None:
        return 0.0, 0.0, 0.0, 0.0
    elem = BYTES[spec.model.text_encoder_precision]
    whole = shape.params * elem
    tokens = text_tokens(f)
    # every layer's hidden state is returned (output_hidden_states), a few temporaries, and the logits
    work = ((shape.layers + 9) * shape.hidden * tokens + tokens * shape.vocab) * elem
    if device == "gpu":
        return whole, whole + work, whole, 0.0
    if device == "offload":
        # trainer/memory/placement.py: the layers stream through a ring of 2 slots, everything else (token table,
        # lm_head, final norm, a vision tower) sits on the GPU; the layers' pinned masters stay in RAM
        on_gpu = (TEXT_ENCODER_RING * shape.layer_params + shape.outside_params) * elem
        return whole, on_gpu + work, on_gpu, shape.layers * shape.layer_params * elem
    return whole, 0.0, 0.0, whole + work  # cpu


def estimate(spec: JobSpec, gpu_vram_gib: float | None = None, gpus: int = 1, *,
             fused_attention: bool | None = None, plan: LowVramPlan | None = None, _suggest: bool = True) -> Estimate:
    """VRAM and RAM per phase of `spec` under `plan` (default: the plan the session would resolve), with a verdict
    against `gpu_vram_gib` (per GPU; default: the job's lowvram.vram_gib). `gpus` data-parallel processes each
    hold a full copy: the VRAM is per GPU, the RAM is for all of them.

    `fused_attention`: whether attention runs in a fused kernel (no s² workspace); default yes: torch's SDPA
    picks a flash kernel on CUDA and on the CPU (the probe measured no s² tensor on the demo).
    """
    f = registry.get_flavour(spec.model.family, spec.model.flavour)
    if gpu_vram_gib is None:
        gpu_vram_gib = spec.lowvram.vram_gib
    if plan is None:
        plan = resolve_lowvram(spec, gpu_vram_gib)
    if fused_attention is None:
        fused_attention = True
    precision = spec.model.base_precision
    compute_elem = 4 if (spec.train.mixed_precision == "no" and precision == "fp32") else 2
    vae_elem = 4 if precision == "fp32" else 2  # the VAE loads in the compute dtype, never quantised
    batch = spec.train.batch_size
    resolution = max(_resolutions(spec))
    image_tokens = (resolution // 16) ** 2
    tokens = image_tokens + text_tokens(f)

    # the frozen transformer: resident blocks and the rest on the GPU, swapped blocks in RAM behind a ring
    layout = weight_layout(f, precision)
    swapped_count = min(plan.blocks_to_swap, f.total_blocks)
    swapped = layout.blocks[:swapped_count]
    base_gpu = layout.other + sum(layout.blocks[swapped_count:])
    base_ram = sum(swapped)
    ring_slots = min(swapped_count, plan.swap_prefetch + 1)
    ring = ring_slots * max(swapped, default=0.0)
    dequant = 2.0 * layout.largest_linear_params if precision in QUANTISED else 0.0

    modules, lora_params = lora_param_counts(f, spec.lora.targets, spec.lora.rank, spec.lora.type)
    lora_bytes = lora_params * 4.0
    if plan.fused_backward:
        grad_bytes = largest_lora_tensor(f, spec.lora.targets, spec.lora.rank, spec.lora.type) * 4.0
    else:
        grad_bytes = lora_params * 4.0
    if spec.train.optimizer == "adafactor":
        optimizer_bytes = adafactor_bytes(f, spec.lora.targets, spec.lora.rank, spec.lora.type)
    else:
        optimizer_bytes = lora_params * OPTIMIZER_BYTES[spec.train.optimizer]
    optimizer_gpu = 0.0 if plan.optimizer_offload else optimizer_bytes
    optimizer_ram = optimizer_bytes + 2 * lora_bytes if plan.optimizer_offload else 0.0  # + masters, grad copies
    act = _training_activations(f, plan, tokens, batch, compute_elem, fused_attention)

    weights_gpu = base_gpu + ring  # allocated once at their size
    step_dynamic = lora_bytes + grad_bytes + optimizer_gpu + act.gpu + act.attention + dequant
    gpu_context = CUDA_CONTEXT_GIB * GIB

    def vram(tensor_bytes: float, weights: float = 0.0) -> float:
        """Weights are allocated once, at their size; the allocator overhead applies to everything else."""
        return ((tensor_bytes - weights) * (1 + ALLOCATOR_OVERHEAD) + weights + gpu_context) / GIB

    # text encoders (skipped on a warm disk cache), then the VAE
    te_loaded = spec.data.cache_text_embeddings != "disk"
    te_whole, te_gpu, te_gpu_weights, te_ram = _text_encoder(f, spec, plan.text_encoder_device)
    vae_bytes = 0.0 if f.is_demo else VAE_PARAMS * vae_elem
    vae_work = 0.0 if f.is_demo else VAE_PEAK_BYTES_PER_PIXEL * resolution * resolution * vae_elem / 2
    sampled = bool(spec.sample.prompts)

    sample_res = spec.sample.resolution or f.sample_resolution
    sample_tokens = (sample_res // 16) ** 2 + text_tokens(f)
    cfg = 2 if (f.guidance == "cfg" and (spec.sample.guidance or f.sample_guidance) > 1.0) else 1
    # the denoiser's no-grad forward (cond and uncond in one batch under CFG), then the VAE decodes: one after
    # the other, so the larger of the two counts
    sample_work = INFERENCE_FACTOR[compute_elem] * f.hidden_size * sample_tokens * cfg
    sample_decode = 0.0 if f.is_demo else VAE_PEAK_BYTES_PER_PIXEL * sample_res**2 * vae_elem / 2
    sampling = weights_gpu + vae_bytes + lora_bytes + optimizer_gpu + dequant + max(sample_work, sample_decode)

    # System RAM per process: the loaded pipeline (the transformer quantised while it streams in: one block in
    # bf16 at a time), then what each phase leaves there; one copy per data-parallel process
    process = PROCESS_RAM_GIB * GIB
    transformer_ram = layout.total
    staging = max(weight_layout(f, "bf16").blocks) if precision in QUANTISED else 0.0
    caches = CACHES_RAM_GIB * GIB
    train_ram = {
        "process (python, torch, CUDA libraries)": process,
        f"swapped base weights ({swapped_count} blocks, {precision}"
        + (", pinned)" if plan.pin_memory else ")"): base_ram,
        "vae (parked for sampling)": vae_bytes if sampled else 0.0,
        "optimizer state + fp32 lora masters and grads (offloaded)": optimizer_ram,
        "checkpoint inputs (offloaded)": act.offloaded,
        "cached latents and embeddings (in memory)": caches,
    }
    ram_step = sum(train_ram.values())
    text_ram = te_ram if te_loaded else 0.0

    phases = {
        "loading": PhaseMemory(vram(0.0), process + transformer_ram + staging + vae_bytes
                               + (te_whole if te_loaded else 0.0)),
        "caching text embeddings": PhaseMemory(
            vram(te_gpu, te_gpu_weights) if te_loaded else vram(0.0), process + transformer_ram + vae_bytes + text_ram),
        "caching latents": PhaseMemory(vram(vae_bytes + vae_work, vae_bytes), process + transformer_ram + caches),
        "training step": PhaseMemory(vram(weights_gpu + step_dynamic, weights_gpu), ram_step),
        "validation sampling": PhaseMemory(
            vram(sampling, weights_gpu + vae_bytes) if sampled else 0.0,
            ram_step - train_ram["vae (parked for sampling)"] - act.offloaded if sampled else 0.0),
    }
    phases = {name: PhaseMemory(p.vram_gib, p.ram_gib * gpus / GIB) for name, p in phases.items()}

    every = plan.checkpointing_interval
    if act.checkpointed == f.total_blocks:
        checkpointing = " (checkpointed" + (", inputs offloaded)" if plan.cpu_offload_checkpointing else ")")
    elif act.checkpointed:
        checkpointing = f" ({act.checkpointed} of {f.total_blocks} blocks checkpointed" + (
            f", every {every}" if plan.gradient_checkpointing and every > 1 else "") + (
            ", inputs offloaded)" if plan.cpu_offload_checkpointing else ")")
    else:
        checkpointing = ""
    breakdown = {
        f"base weights on GPU ({precision})": base_gpu / GIB,
        f"swap ring ({ring_slots} x largest swapped block)": ring / GIB,
        "lora weights (fp32)": lora_bytes / GIB,
        "lora grads (fp32" + (", fused backward: one tensor at a time)" if plan.fused_backward else ")"):
            grad_bytes / GIB,
        f"optimizer state ({spec.train.optimizer}" + (", offloaded to RAM)" if plan.optimizer_offload else ")"):
            optimizer_gpu / GIB,
        "activations" + checkpointing: act.gpu / GIB,
        "attention workspace": act.attention / GIB,
        "dequantisation workspace": dequant / GIB,
        "cuda context": CUDA_CONTEXT_GIB,
        "allocator overhead": step_dynamic * ALLOCATOR_OVERHEAD / GIB,
    }
    components = {
        f"transformer ({precision})": layout.total / GIB,
        f"text encoder ({f.text_encoder_label}, {spec.model.text_encoder_precision})": te_whole / GIB,
        "vae": vae_bytes / GIB,
    }
    notes = [f"{modules} {spec.lora.type} modules, {lora_params:,} trainable parameters; "
             f"{tokens} tokens per sample ({image_tokens} image + {text_tokens(f)} text) at {resolution} px",
             f"plan: {plan.describe()}"]
    if not f.is_demo:
        per_caption = text_tokens(f) * f.joint_attention_dim * 2 / 1024**2
        notes.append(f"each caption's cached text embedding takes {per_caption:.1f} MiB "
                     f"({'on disk' if not te_loaded else 'in RAM'})")
    if not te_loaded and te_whole:
        notes.append(f"assumes the text embeddings are already on disk; a first run caches them with the text encoder "
                     f"({plan.text_encoder_device}): {vram(te_gpu, te_gpu_weights):.1f} GiB VRAM, "
                     f"{(process + transformer_ram + vae_bytes + te_ram) * gpus / GIB:.1f} GiB RAM")
    if f.needs_reference_image:
        notes.append("counts no reference-image tokens: training with a conditioning image doubles the image tokens")
    result = Estimate(
        vram_gib=max(p.vram_gib for p in phases.values()),
        ram_gib=max(p.ram_gib for p in phases.values()),
        phases=phases, breakdown=breakdown, notes=notes,
        ram_breakdown={name: value * gpus / GIB for name, value in train_ram.items()},
        components=components, plan=plan.describe(),
    )
    if gpu_vram_gib is not None:
        result.verdict = verdict(result.vram_gib, gpu_vram_gib)
        if result.verdict != "fits" and _suggest:
            from trainer.estimator_suggest import suggest  # it calls back into estimate()

            result.suggestion = suggest(spec, gpu_vram_gib, gpus, fused_attention)
    return result


def verdict(need_gib: float, gpu_vram_gib: float) -> str:
    if need_gib > gpu_vram_gib:
        return "will not fit"
    return "tight" if need_gib > TIGHT_SHARE * gpu_vram_gib else "fits"
