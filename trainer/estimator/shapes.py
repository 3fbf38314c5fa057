"""Shapes for the memory estimator: every Linear of the FLUX transformers, their bytes per storage precision,
the blocks they belong to, the LoRA/LoKr parameter counts, and the text encoders' sizes. Torch-free.

The transformer Linears are formulas of the hidden size h, the MLP width m (FLUX.2: 3·h, SwiGLU so the input
projections are 2·m wide; FLUX.1: 4·h, GELU), the joint (text) dim, plus biases and the RMSNorm weights; tests
check them against diffusers 0.42 on the meta device. LoRA/LoKr counts match the module names with the same
patterns as trainer/adapters.py.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace

from trainer import registry
from trainer.adapters import _PRESET_PATTERNS  # torch-free at import

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5, "nf4": 0.5}
# Bytes per weight of a large quantised Linear, its fp32 scales included (one per row: negligible; one per 64)
WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 64, "nf4": 0.5 + 4 / 64}
QUANTISED = ("fp8", "int8", "int4", "nf4")
# One fp32 scale per output row (fp8 e4m3, int8), or per group of 64 weights (int4, nf4: the bitsandbytes and
# quanto default group size). What trainer/memory/quantize.py stores; recheck if it changes.
SCALE_GROUP = {"int4": 64, "nf4": 64}
_BLOCK_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


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
    pooled = f.pooled_dim  # CLIP-L pooled projection
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


@functools.lru_cache(maxsize=64)
def _linears(f: registry.Flavour) -> tuple[Linear, ...]:
    return tuple(_flux2_linears(f) if f.family == "flux2" else _flux1_linears(f))


def _norms_per_block(f: registry.Flavour, index: int) -> int:
    """RMSNorm weights of the QK norms (head_dim each): norm_q/k, plus norm_added_q/k in double blocks."""
    return (4 if index < f.double_blocks else 2) * f.head_dim


def transformer_params(f: registry.Flavour) -> int:
    """All parameters: the Linears plus the RMSNorm weights of the QK norms."""
    return sum(linear.params for linear in _linears(f)) + sum(_norms_per_block(f, i) for i in range(f.total_blocks))


def block_index(f: registry.Flavour, name: str) -> int | None:
    """The position of the block holding module `name` in forward order (double blocks first), None outside."""
    match = _BLOCK_NAME.match(name)
    if match is None:
        return None
    index = int(match.group(2))
    return index if match.group(1) == "transformer_blocks" else f.double_blocks + index


def _is_modulation(name: str) -> bool:
    # AdaLN modulation inside FLUX.1 blocks (norm1.linear, norm1_context.linear, norm.linear)
    return ".norm" in name


def linear_bytes(linear: Linear, precision: str, quantised: bool) -> float:
    """Bytes of one Linear's weight and bias stored in `precision`; `quantised` for the block Linears that
    trainer/memory/quantize.py converts (the bias stays in bf16 beside the quantised weight)."""
    weights = linear.in_features * linear.out_features
    if not quantised:
        return linear.params * BYTES[precision]
    group = SCALE_GROUP.get(precision)
    scales = math.ceil(weights / group) if group else linear.out_features
    return weights * BYTES[precision] + 4 * scales + (2 * linear.out_features if linear.bias else 0)


@dataclass(frozen=True)
class WeightLayout:
    """The frozen transformer in one storage precision: bytes per block (forward order) and outside them."""

    blocks: tuple[float, ...]
    other: float  # embedders, modulation, norm_out, proj_out: always on the GPU
    largest_linear_params: int  # the biggest quantised Linear: its dequantised copy is the workspace

    @property
    def total(self) -> float:
        return sum(self.blocks) + self.other


@functools.lru_cache(maxsize=256)
def weight_layout(f: registry.Flavour, precision: str, modulation: str | None = None) -> WeightLayout:
    """Only block Linears are quantised; FLUX.1's in-block modulation Linears in `modulation` (a quantised
    format, see trainer.spec.modulation_format) or, None, in bf16; embedders, norm_out and proj_out in bf16."""
    quantising = precision in QUANTISED
    plain = "bf16" if quantising else precision
    blocks = [_norms_per_block(f, i) * BYTES[plain] for i in range(f.total_blocks)]
    other, largest = 0.0, 0
    for linear in _linears(f):
        index = block_index(f, linear.name)
        if index is None:
            other += linear_bytes(linear, plain, False)
            continue
        stored = (modulation if _is_modulation(linear.name) else precision) if quantising else None
        quantised = stored is not None
        blocks[index] += linear_bytes(linear, stored if quantised else plain, quantised)
        if quantised:
            largest = max(largest, linear.in_features * linear.out_features)
    return WeightLayout(tuple(blocks), other, largest)


# ------------------------------------------------------------------------------------------ adapters


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


def _lokr_tensors(linear: Linear, rank: int) -> tuple[int, ...]:
    """The sizes of peft's LoKr tensors for one Linear (decompose_both off: w1 is always full)."""
    out_l, out_k = _factorization(linear.out_features)
    in_m, in_n = _factorization(linear.in_features)
    w1 = out_l * in_m
    if rank >= max(out_k, in_n) / 2:
        return (w1, out_k * in_n)
    return (w1, rank * out_k, rank * in_n)


def _lora_tensors(linear: Linear, rank: int, type: str) -> tuple[int, ...]:
    if type == "lokr":
        return _lokr_tensors(linear, rank)
    return (rank * linear.in_features, rank * linear.out_features)


@functools.lru_cache(maxsize=256)
def lora_param_counts(f: registry.Flavour, targets: str, rank: int, type: str = "lora") -> tuple[int, int]:
    """(modules, trainable parameters) of the adapter on flavour `f`."""
    chosen = _targeted(f, targets)
    return len(chosen), sum(sum(_lora_tensors(linear, rank, type)) for linear in chosen)


@functools.lru_cache(maxsize=256)
def largest_lora_tensor(f: registry.Flavour, targets: str, rank: int, type: str = "lora") -> int:
    """Elements of the biggest single trainable tensor: what a fused backward keeps as a gradient at a time."""
    return max((max(_lora_tensors(linear, rank, type)) for linear in _targeted(f, targets)), default=0)


def adafactor_bytes(f: registry.Flavour, targets: str, rank: int, type: str) -> float:
    """Factored second moment: one fp32 value per row and per column of every matrix (no momentum)."""
    total = 0
    for linear in _targeted(f, targets):
        if type == "lokr":
            total += 4 * (linear.in_features + linear.out_features)  # rough: a few small factors
        else:
            total += 4 * ((rank + linear.in_features) + (linear.out_features + rank))
    return float(total)


# ------------------------------------------------------------------------------------------ text encoders


@dataclass(frozen=True)
class TextEncoderShape:
    """Sizes from the models' config.json files: decoder layers, hidden size, vocabulary, feed-forward width. A
    decoder's language-model head is never loaded (trainer/sources/single_file.py NoLogits: prompts read hidden
    states), so `params` counts the token table once, tied or not."""

    params: float  # everything loaded: the repeated layers, the token embedding, extras
    layers: int
    hidden: int
    vocab: int
    ffn: int  # a layer's widest Linear is hidden x ffn (the MLP's): the most a quantised Linear dequantises at once
    extra: float = 0.0  # parameters outside the layers besides the table: a vision tower, or CLIP-L beside T5

    @property
    def layer_params(self) -> float:
        return (self.params - self.vocab * self.hidden - self.extra) / self.layers

    @property
    def outside_params(self) -> float:
        """Everything but the repeated layers: what a streamed ("offload") encoder keeps on the GPU whole."""
        return self.params - self.layers * self.layer_params


TEXT_ENCODERS = {  # by Flavour.text_encoder_label; params without the untied heads (Qwen3-8B 0.62 B, Mistral 0.67 B)
    "Qwen3-4B": TextEncoderShape(4.02e9, 36, 2560, 151936, ffn=9728),
    "Qwen3-8B": TextEncoderShape(7.57e9, 36, 4096, 151936, ffn=12288),
    # Mistral3ForConditionalGeneration: 40 text layers and a ≈0.44 B vision tower (unused for prompts)
    "Mistral-Small-3.1-24B": TextEncoderShape(23.33e9, 40, 5120, 131072, ffn=32768, extra=0.44e9),
    # T5-XXL's encoder (24 layers of d_model 4096, no lm_head); CLIP-L (0.12 B) runs first, whole
    "CLIP-L + T5-XXL": TextEncoderShape(4.76e9 + 0.12e9, 24, 4096, 32128, ffn=10240, extra=0.12e9),
}


def _released_text_encoder(f: registry.Flavour) -> TextEncoderShape | None:
    return None if f.is_demo else TEXT_ENCODERS.get(f.text_encoder_label)


def loaded_text_encoder(f: registry.Flavour) -> TextEncoderShape | None:
    """The text encoder as the loader builds it (trainer/sources/single_file.py `_prune_layers`): a decoder keeps
    its layers up to the deepest hidden state the pipeline stacks, plus that layer's successor, and no image tower
    (klein: 28 of Qwen3's 36 layers; FLUX.2 dev: 31 of Mistral's 40, as ComfyUI's own file); None for the demo."""
    shape = _released_text_encoder(f)
    if shape is None or not f.text_encoder_layers:
        return shape
    keep = min(max(f.text_encoder_layers) + 1, shape.layers)
    # for a FLUX.2 decoder `extra` is Mistral's image tower, dropped with the layers past `keep`
    loaded = shape.params - (shape.layers - keep) * shape.layer_params - shape.extra
    return replace(shape, params=loaded, layers=keep, extra=0.0)


def text_encoder_file_gib(f: registry.Flavour) -> float:
    """The released bf16 text encoder's size (every layer and tower, heads aside), GiB: what a user downloads, of
    which `loaded_text_encoder` is what loads."""
    shape = _released_text_encoder(f)
    return 0.0 if shape is None else shape.params * BYTES["bf16"] / 1024**3


def text_tokens(f: registry.Flavour) -> int:
    if f.is_demo:
        return registry.DEMO_TEXT_TOKENS
    return 256 if f.name == "schnell" else 512
