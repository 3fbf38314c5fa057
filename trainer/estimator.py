"""Torch-free prediction of the VRAM and system RAM a job needs, phase by phase, with a verdict for one GPU.

Imports only the standard library, `trainer.registry`, `trainer.spec` and `trainer.adapters` (for the LoRA
preset patterns; that module loads torch only inside its functions). One estimate takes well under 50 ms.

What is computed exactly (from the module shapes, not from `params_billion`):
- transformer parameters: every Linear of Flux2Transformer2DModel / FluxTransformer2DModel as formulas of the
  hidden size h, the MLP width m (FLUX.2: 3·h, SwiGLU so the input projections are 2·m wide; FLUX.1: 4·h, GELU),
  the joint (text) dim, plus biases and the RMSNorm weights; tests check them against diffusers on the meta device;
- LoRA / LoKr parameters for any preset or regex (the module names are matched with the same patterns as
  trainer/adapters.py), rank·(in + out) per LoRA module, peft's Kronecker factorisation for LoKr.

What is assumed (figures from shared/TECHNIQUES.md, "Activations" and "Optimiser", marked where fitted):
- activations per token per block: ≈50·h bytes in 16-bit without checkpointing, ≈2·h with it plus one block's
  recomputation (≈50·h·tokens); twice that when the forward runs in fp32 (mixed_precision "no" with an fp32 base);
  tokens = image tokens (res/16)² + text tokens (512 for real flavours, 256 schnell, 64 demo);
- attention workspace: fused kernels (SDPA, CUDA and CPU) ≈0; otherwise the attention probabilities, 4·heads·s² bytes
  per block for the block being computed;
- LoRA weights, gradients in fp32 (peft keeps adapters in fp32); optimiser state per trainable parameter:
  AdamW 8 B, AdamW8bit 2 B, Lion8bit 1 B, Adafactor ≈ 4·(rows + cols) per matrix (factored), Prodigy ≈16 B;
- text encoders by label: Qwen3-4B 4.0 B, Qwen3-8B 8.2 B, Mistral-Small-3.1-24B 24 B, T5-XXL 4.7 B + CLIP-L
  0.12 B parameters; demo text encoders ≈0; VAE ≈84 M parameters (FLUX.1 and FLUX.2 VAEs), demo ≈0;
- CUDA context 0.5 GiB, allocator overhead 10 % of the GPU tensors other than the frozen weights.
- the "training step" phase is the sum of the breakdown's GPU items (base weights, LoRA weights and grads,
  optimiser state, activations, attention workspace, context, overhead); the tensor part of it (without context
  and overhead) is what trainer/memory_probe.py measures; the demo agrees within a few per cent.

Phases follow trainer/session.py: the pipeline (transformer, VAE and, unless the text embeddings are cached on
disk, the text encoders) is loaded onto the GPU; text embeddings are cached; the text encoders are freed; latents
are cached; the VAE is parked in system RAM; the LoRA and optimiser are added; training; validation sampling
brings the VAE back. With `data.cache_text_embeddings = "disk"` the estimate assumes a warm cache (a repeated
run): the first run with a cold disk cache loads the text encoders as with "memory" (see `Estimate.notes`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from trainer import registry
from trainer.adapters import _PRESET_PATTERNS  # torch-free at import
from trainer.memory.strategies import LowVramPlan, resolve_lowvram
from trainer.spec import JobSpec

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5, "nf4": 0.5}
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_OVERHEAD = 0.10
TIGHT_SHARE = 0.90

# Activation bytes per token per block per unit of hidden size, in 16-bit (TECHNIQUES "Activations": ≈50·h).
# Fitted on the demo with trainer/memory_probe.py (fp32, batch 2, 80 tokens): FLUX.2 49.4·h, FLUX.1 39.4·h;
# TECHNIQUES' FLUX.1 figure (≈40 GB at 1024 px) implies ≈45·h, so FLUX.1's constant may be ≈10 % low at real size.
ACTIVATION_FACTOR = {"flux2": 50.0, "flux1": 40.0}
CHECKPOINT_FACTOR = 2.0  # bytes per token per block per h kept when every block is checkpointed
# The block being recomputed during backward, with its gradient temporaries, in units of one block's activations;
# fitted on the demo (FLUX.2 1.17, FLUX.1 1.07).
RECOMPUTE_FACTOR = 1.15

# Bytes of optimiser state per trainable parameter (adafactor is computed per matrix).
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "lion8bit": 1.0, "prodigy": 16.0}

TEXT_ENCODER_PARAMS = {  # by Flavour.text_encoder_label
    "Qwen3-4B": 4.0e9,
    "Qwen3-8B": 8.2e9,
    "Mistral-Small-3.1-24B": 24.0e9,
    "CLIP-L + T5-XXL": 4.7e9 + 0.12e9,
}
VAE_PARAMS = 84e6  # both FLUX VAEs; the encoder alone is about a third
VAE_PEAK_BYTES_PER_PIXEL = 400.0  # activations of one image through the VAE (slicing: one image at a time), 16-bit

PHASES = ("loading", "caching text embeddings", "caching latents", "training step", "validation sampling")

# The changes the trainer supports today, cheapest first: (label, apply(spec) -> changed spec or None).
SUGGESTION_ORDER = (
    "lowvram.gradient_checkpointing = true",
    "train.batch_size = {value}",
    "data.resolution = {value}",
    'model.base_precision = "bf16"',
    'data.cache_text_embeddings = "disk"',
)


@dataclass(frozen=True)
class PhaseMemory:
    vram_gib: float
    ram_gib: float


@dataclass
class Estimate:
    vram_gib: float
    ram_gib: float
    phases: dict[str, PhaseMemory]
    breakdown: dict[str, float]
    verdict: str | None = None  # "fits", "tight", "will not fit"; None without a GPU size
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "vram_gib": round(self.vram_gib, 3),
            "ram_gib": round(self.ram_gib, 3),
            "phases": {name: {"vram_gib": round(p.vram_gib, 3), "ram_gib": round(p.ram_gib, 3)}
                       for name, p in self.phases.items()},
            "breakdown": {name: round(value, 4) for name, value in self.breakdown.items()},
            "verdict": self.verdict,
            "suggestion": self.suggestion,
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------ module shapes


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def _flux2_linears(f: registry.Flavour) -> list[Linear]:
    """Every Linear of Flux2Transformer2DModel (diffusers 0.42); no biases anywhere."""
    h, j = f.hidden_size, f.joint_attention_dim
    m = int(h * 3.0)  # mlp_ratio 3.0; SwiGLU: linear_in is 2·m wide, linear_out takes m
    channels = f.latent_channels * 4  # 2x2 packed latents, patch_size 1
    t = 32 if f.is_demo else 256  # timestep_guidance_channels (the demo is built with 32)
    out: list[Linear] = [
        Linear("x_embedder", channels, h, False),
        Linear("context_embedder", j, h, False),
        Linear("time_guidance_embed.timestep_embedder.linear_1", t, h, False),
        Linear("time_guidance_embed.timestep_embedder.linear_2", h, h, False),
    ]
    if f.guidance == "embedded":
        out += [Linear("time_guidance_embed.guidance_embedder.linear_1", t, h, False),
                Linear("time_guidance_embed.guidance_embedder.linear_2", h, h, False)]
    out += [Linear("double_stream_modulation_img.linear", h, 6 * h, False),
            Linear("double_stream_modulation_txt.linear", h, 6 * h, False),
            Linear("single_stream_modulation.linear", h, 3 * h, False)]
    for i in range(f.double_blocks):
        p = f"transformer_blocks.{i}."
        out += [Linear(p + "attn." + n, h, h, False) for n in ("to_q", "to_k", "to_v")]
        out.append(Linear(p + "attn.to_out.0", h, h, False))
        out += [Linear(p + "attn." + n, h, h, False) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        out.append(Linear(p + "attn.to_add_out", h, h, False))
        for ff in ("ff", "ff_context"):
            out += [Linear(f"{p}{ff}.linear_in", h, 2 * m, False), Linear(f"{p}{ff}.linear_out", m, h, False)]
    for i in range(f.single_blocks):
        p = f"single_transformer_blocks.{i}."
        out += [Linear(p + "attn.to_qkv_mlp_proj", h, 3 * h + 2 * m, False),
                Linear(p + "attn.to_out", h + m, h, False)]
    out += [Linear("norm_out.linear", h, 2 * h, False), Linear("proj_out", h, channels, False)]
    return out


def _flux1_linears(f: registry.Flavour) -> list[Linear]:
    """Every Linear of FluxTransformer2DModel (diffusers 0.42); all with biases."""
    h, j = f.hidden_size, f.joint_attention_dim
    m = 4 * h  # mlp_ratio 4.0, GELU (tanh)
    channels = f.latent_channels * 4
    pooled = j if f.is_demo else 768  # CLIP-L pooled projection
    out: list[Linear] = [
        Linear("time_text_embed.timestep_embedder.linear_1", 256, h, True),
        Linear("time_text_embed.timestep_embedder.linear_2", h, h, True),
    ]
    if f.guidance == "embedded":
        out += [Linear("time_text_embed.guidance_embedder.linear_1", 256, h, True),
                Linear("time_text_embed.guidance_embedder.linear_2", h, h, True)]
    out += [Linear("time_text_embed.text_embedder.linear_1", pooled, h, True),
            Linear("time_text_embed.text_embedder.linear_2", h, h, True),
            Linear("context_embedder", j, h, True),
            Linear("x_embedder", channels, h, True)]
    for i in range(f.double_blocks):
        p = f"transformer_blocks.{i}."
        out += [Linear(p + "norm1.linear", h, 6 * h, True), Linear(p + "norm1_context.linear", h, 6 * h, True)]
        out += [Linear(p + "attn." + n, h, h, True) for n in ("to_q", "to_k", "to_v")]
        out += [Linear(p + "attn." + n, h, h, True) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        out += [Linear(p + "attn.to_out.0", h, h, True), Linear(p + "attn.to_add_out", h, h, True)]
        for ff in ("ff", "ff_context"):
            out += [Linear(f"{p}{ff}.net.0.proj", h, m, True), Linear(f"{p}{ff}.net.2", m, h, True)]
    for i in range(f.single_blocks):
        p = f"single_transformer_blocks.{i}."
        out += [Linear(p + "norm.linear", h, 3 * h, True), Linear(p + "proj_mlp", h, m, True)]
        out += [Linear(p + "attn." + n, h, h, True) for n in ("to_q", "to_k", "to_v")]
        out.append(Linear(p + "proj_out", h + m, h, True))
    out += [Linear("norm_out.linear", h, 2 * h, True), Linear("proj_out", h, channels, True)]
    return out


def transformer_linears(f: registry.Flavour) -> list[Linear]:
    return list(_linears(f))


@functools.lru_cache(maxsize=64)
def _linears(f: registry.Flavour) -> tuple[Linear, ...]:
    return tuple(_flux2_linears(f) if f.family == "flux2" else _flux1_linears(f))


def transformer_params(f: registry.Flavour) -> int:
    """All parameters: the Linears plus the RMSNorm weights of the QK norms (head_dim each)."""
    norms_per_block = 4 * f.double_blocks + 2 * f.single_blocks  # norm_q/k (+ norm_added_q/k in double blocks)
    return sum(linear.params for linear in transformer_linears(f)) + norms_per_block * f.head_dim


@functools.lru_cache(maxsize=256)
def _targeted(f: registry.Flavour, targets: str) -> tuple[Linear, ...]:
    presets = _PRESET_PATTERNS[f.family]
    patterns = presets.get(targets, (targets,))
    compiled = [re.compile(p) for p in patterns]
    return tuple(linear for linear in _linears(f) if any(p.fullmatch(linear.name) for p in compiled))


def _factorization(dimension: int) -> tuple[int, int]:
    """peft's LoKr `factorization(dimension, factor=-1)`: the two factors closest to a square root."""
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _lokr_params(linear: Linear, rank: int) -> int:
    out_l, out_k = _factorization(linear.out_features)
    in_m, in_n = _factorization(linear.in_features)
    w1 = out_l * in_m  # decompose_both is off: w1 is always full
    w2 = out_k * in_n if rank >= max(out_k, in_n) / 2 else rank * (out_k + in_n)
    return w1 + w2


def lora_param_counts(f: registry.Flavour, targets: str, rank: int, type: str = "lora") -> tuple[int, int]:
    """(modules, trainable parameters) of the adapter on flavour `f`."""
    chosen = _targeted(f, targets)
    if type == "lokr":
        return len(chosen), sum(_lokr_params(linear, rank) for linear in chosen)
    return len(chosen), sum(rank * (linear.in_features + linear.out_features) for linear in chosen)


def _adafactor_bytes(f: registry.Flavour, targets: str, rank: int, type: str) -> float:
    """Factored second moment: one fp32 value per row and per column of every matrix (no momentum)."""
    total = 0
    for linear in _targeted(f, targets):
        if type == "lokr":
            total += 4 * (linear.in_features + linear.out_features)  # rough: a few small factors
        else:
            total += 4 * ((rank + linear.in_features) + (linear.out_features + rank))
    return float(total)


def text_tokens(f: registry.Flavour) -> int:
    if f.is_demo:
        return 64
    return 256 if f.name == "schnell" else 512


def _resolutions(spec: JobSpec) -> list[int]:
    values = [spec.data.resolution] if isinstance(spec.data.resolution, int) else list(spec.data.resolution)
    for entry in spec.data.datasets:
        if entry.resolution:
            values += [entry.resolution] if isinstance(entry.resolution, int) else list(entry.resolution)
    return values


# ------------------------------------------------------------------------------------------ the estimate


def _training_activations(f: registry.Flavour, tokens: int, batch: int, elem: int, checkpointing: bool,
                          fused_attention: bool) -> tuple[float, float]:
    """(saved activations, attention workspace) in bytes for one forward+backward."""
    h, blocks = f.hidden_size, f.total_blocks
    scale = elem / 2  # the figures are for 16-bit activations
    one_block = ACTIVATION_FACTOR[f.family] * h * tokens * batch * scale
    if checkpointing:
        saved = CHECKPOINT_FACTOR * h * tokens * batch * scale * blocks + RECOMPUTE_FACTOR * one_block
    else:
        saved = one_block * blocks
    attention = 0.0 if fused_attention else 4.0 * f.num_heads * tokens * tokens * batch * (elem / 2)
    if not fused_attention and not checkpointing:
        attention *= blocks  # the probabilities of every block are saved for backward
    return saved, attention


def estimate(spec: JobSpec, gpu_vram_gib: float | None = None, gpus: int = 1, *,
             fused_attention: bool | None = None, plan: LowVramPlan | None = None, _suggest: bool = True) -> Estimate:
    """VRAM and RAM per phase of `spec`, with a verdict against `gpu_vram_gib` (per GPU; `gpus` GPUs each hold a
    full copy, as in data-parallel training, and the system RAM holds one staging copy per GPU).

    `fused_attention`: whether attention runs in a fused kernel (no s² workspace); default yes: torch's SDPA
    picks a flash kernel on CUDA and on the CPU (the probe measured no s² tensor on the demo).
    """
    f = registry.get_flavour(spec.model.family, spec.model.flavour)
    if plan is None:
        plan = resolve_lowvram(spec, gpu_vram_gib)
    if fused_attention is None:
        fused_attention = True
    base_elem = BYTES[spec.model.base_precision]
    te_elem = BYTES[spec.model.text_encoder_precision]
    compute_elem = 4 if (spec.train.mixed_precision == "no" and spec.model.base_precision == "fp32") else 2
    batch = spec.train.batch_size
    resolution = max(_resolutions(spec))
    image_tokens = (resolution // 16) ** 2
    tokens = image_tokens + text_tokens(f)

    base_bytes = transformer_params(f) * base_elem
    te_bytes = 0.0 if f.is_demo else TEXT_ENCODER_PARAMS.get(f.text_encoder_label, 0.0) * te_elem
    vae_bytes = 0.0 if f.is_demo else VAE_PARAMS * base_elem
    modules, lora_params = lora_param_counts(f, spec.lora.targets, spec.lora.rank, spec.lora.type)
    lora_bytes = lora_params * 4.0
    grad_bytes = lora_params * 4.0
    if spec.train.optimizer == "adafactor":
        optimizer_bytes = _adafactor_bytes(f, spec.lora.targets, spec.lora.rank, spec.lora.type)
    else:
        optimizer_bytes = lora_params * OPTIMIZER_BYTES[spec.train.optimizer]
    activations, attention = _training_activations(f, tokens, batch, compute_elem,
                                                   plan.gradient_checkpointing, fused_attention)
    # a base in fp32 under bf16 autocast keeps 16-bit copies of the weights of the block being computed
    step_tensors = base_bytes + lora_bytes + grad_bytes + optimizer_bytes + activations + attention

    # text-encoder pass: weights + a forward without grad (a few hidden states of the prompt batch)
    text_hidden = 5120 if f.text_encoder_label.startswith("Mistral") else 4096
    te_work = 0.0 if f.is_demo else 8.0 * text_hidden * text_tokens(f) * te_elem
    vae_work = VAE_PEAK_BYTES_PER_PIXEL * resolution * resolution * (base_elem / 2) * (0 if f.is_demo else 1)
    te_loaded = spec.data.cache_text_embeddings != "disk"

    gpu_context = CUDA_CONTEXT_GIB * GIB

    def vram(tensor_bytes: float, weights: float = 0.0) -> float:
        """Weights are allocated once, at their size; the allocator overhead applies to everything else."""
        return ((tensor_bytes - weights) * (1 + ALLOCATOR_OVERHEAD) + weights + gpu_context) / GIB

    loading = base_bytes + vae_bytes + (te_bytes if te_loaded else 0.0)
    caching_text = loading + (te_work if te_loaded else 0.0)
    caching_latents = base_bytes + vae_bytes + vae_work
    sample_res = spec.sample.resolution or f.sample_resolution
    sample_tokens = (sample_res // 16) ** 2 + text_tokens(f)
    cfg = 2 if (f.guidance == "cfg" and (spec.sample.guidance or f.sample_guidance) > 1.0) else 1
    # one block's activations, no grad
    sample_work = ACTIVATION_FACTOR[f.family] * f.hidden_size * sample_tokens * cfg * compute_elem / 2
    sampling = base_bytes + lora_bytes + vae_bytes + sample_work + VAE_PEAK_BYTES_PER_PIXEL * sample_res**2
    if not spec.sample.prompts:
        sampling = 0.0

    # System RAM: the process (≈2 GiB of libraries), the weights while they are read (safetensors maps the file;
    # one staging copy of the largest component), the parked VAE, cached latents and embeddings (small).
    process = 2.0 * GIB
    staging = max(base_bytes, te_bytes if te_loaded else 0.0) * gpus
    phases = {
        "loading": PhaseMemory(vram(loading, loading), (process + staging) / GIB),
        "caching text embeddings": PhaseMemory(vram(caching_text, loading), process / GIB + 0.1),
        "caching latents": PhaseMemory(vram(caching_latents, base_bytes + vae_bytes), process / GIB + 0.1),
        "training step": PhaseMemory(vram(step_tensors, base_bytes), (process + vae_bytes) / GIB + 0.1),
        "validation sampling": PhaseMemory(vram(sampling, base_bytes + vae_bytes) if sampling else 0.0,
                                           process / GIB + 0.1),
    }
    breakdown = {
        f"base weights ({spec.model.base_precision}, GPU)": base_bytes / GIB,
        f"text encoder ({spec.model.text_encoder_precision}, GPU while caching)": te_bytes / GIB,
        "vae (GPU while caching and sampling, else RAM)": vae_bytes / GIB,
        "lora weights (fp32)": lora_bytes / GIB,
        "lora grads (fp32)": grad_bytes / GIB,
        f"optimizer state ({spec.train.optimizer})": optimizer_bytes / GIB,
        "activations" + (" (checkpointed)" if plan.gradient_checkpointing else ""): activations / GIB,
        "attention workspace": attention / GIB,
        "cuda context": CUDA_CONTEXT_GIB,
        "allocator overhead": (step_tensors - base_bytes) * ALLOCATOR_OVERHEAD / GIB,
    }
    notes = [f"{modules} {spec.lora.type} modules, {lora_params:,} trainable parameters; "
             f"{tokens} tokens per sample ({image_tokens} image + {text_tokens(f)} text) at {resolution} px"]
    if not te_loaded and te_bytes:
        notes.append(f"assumes the text embeddings are already on disk; a first run loads the text encoder beside "
                     f"the transformer: {vram(loading + te_bytes + te_work):.1f} GiB")
    result = Estimate(
        vram_gib=max(p.vram_gib for p in phases.values()),
        ram_gib=max(p.ram_gib for p in phases.values()),
        phases=phases, breakdown=breakdown, notes=notes,
    )
    if gpu_vram_gib is not None:
        result.verdict = verdict(result.vram_gib, gpu_vram_gib)
        if result.verdict != "fits" and _suggest:
            result.suggestion = suggest(spec, gpu_vram_gib, gpus, fused_attention)
    return result


def verdict(need_gib: float, gpu_vram_gib: float) -> str:
    if need_gib > gpu_vram_gib:
        return "will not fit"
    return "tight" if need_gib > TIGHT_SHARE * gpu_vram_gib else "fits"


def _candidates(spec: JobSpec) -> list[tuple[str, dict[str, Any]]]:
    """(label, overrides) in the fixed order of SUGGESTION_ORDER; each builds on nothing but the spec."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not spec.lowvram.gradient_checkpointing:
        out.append((SUGGESTION_ORDER[0], {"lowvram": {"gradient_checkpointing": True}}))
    batch = spec.train.batch_size
    while batch > 1:
        batch //= 2
        out.append((SUGGESTION_ORDER[1].format(value=batch), {"train": {"batch_size": batch}}))
    top = max(_resolutions(spec))
    for value in (1024, 768, 512, 256):
        if value < top and value % spec.data.bucket_step == 0 and not any(
                e.resolution for e in spec.data.datasets):
            out.append((SUGGESTION_ORDER[2].format(value=value), {"data": {"resolution": value}}))
    if spec.model.base_precision == "fp32":
        out.append((SUGGESTION_ORDER[3], {"model": {"base_precision": "bf16"}}))
    if spec.data.cache_text_embeddings != "disk":
        out.append((SUGGESTION_ORDER[4], {"data": {"cache_text_embeddings": "disk"}}))
    return out


def _apply(spec: JobSpec, overrides: dict[str, dict[str, Any]]) -> JobSpec:
    update = {section: getattr(spec, section).model_copy(update=values) for section, values in overrides.items()}
    return spec.model_copy(update=update)


def suggest(spec: JobSpec, gpu_vram_gib: float, gpus: int = 1, fused_attention: bool | None = None) -> str:
    """The first single change of the fixed list that makes the job fit; else the changes combined, or a note."""
    for label, overrides in _candidates(spec):
        changed = _apply(spec, overrides)
        if estimate(changed, gpu_vram_gib, gpus, fused_attention=fused_attention, _suggest=False).verdict == "fits":
            return label
    # no single change is enough: accumulate the changes in order until it fits, then relax each setting to its
    # mildest value that still fits (e.g. the highest resolution), keeping the others
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    fits = False
    for label, overrides in _candidates(spec):
        chosen[label.split(" =")[0]] = (label, overrides)
        if _fits(spec, chosen, gpu_vram_gib, gpus, fused_attention):
            fits = True
            break
    if not fits:
        return "none of the supported changes is enough; use a GPU with more memory or a smaller flavour"
    options: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for label, overrides in _candidates(spec):
        options.setdefault(label.split(" =")[0], []).append((label, overrides))
    for setting in list(chosen):
        for option in [None, *options[setting]]:
            trial = dict(chosen)
            if option is None:
                del trial[setting]
            else:
                trial[setting] = option
            if _fits(spec, trial, gpu_vram_gib, gpus, fused_attention):
                chosen = trial
                break
    return "; ".join(label for label, _ in chosen.values())


def _fits(spec: JobSpec, chosen: dict[str, tuple[str, dict[str, Any]]], gpu_vram_gib: float, gpus: int,
          fused_attention: bool | None) -> bool:
    combined: dict[str, dict[str, Any]] = {}
    for _, overrides in chosen.values():
        for section, values in overrides.items():
            combined.setdefault(section, {}).update(values)
    changed = _apply(spec, combined)
    return estimate(changed, gpu_vram_gib, gpus, fused_attention=fused_attention, _suggest=False).verdict == "fits"
