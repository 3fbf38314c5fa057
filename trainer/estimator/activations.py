"""Working memory for the memory estimator (trainer/estimator/core.py): the activations one forward+backward keeps
under the plan's checkpointing and swap, and what caching text embeddings needs where the text encoder runs.
Torch-free; the factors were measured with trainer/memory_probe.py on the CPU (see each constant).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from trainer import registry
from trainer.estimator.plans import LowVramPlan
from trainer.estimator.shapes import BYTES, WEIGHT_BYTES, TextEncoderShape, loaded_text_encoder, text_tokens
from trainer.spec import JobSpec, text_encoder_precision

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
# advanced.attention's working memory. flash-attn and xformers keep no s² probabilities but save an fp32
# log-sum-exp per head and query token for backward; sdpa keeps nothing extra when torch picks a fused kernel and
# the s² probabilities when it falls back to the math kernel (fused_attention = false); sage trains as sdpa and
# samples with int8 copies of the queries and keys (SAGE_SAMPLING_BYTES per token per hidden unit).
LSE_BYTES = {"flash": 4.0, "xformers": 4.0}
SAGE_SAMPLING_BYTES = 2.0


@dataclass(frozen=True)
class Activations:
    gpu: float  # saved for backward on the GPU, with the block being recomputed
    attention: float
    offloaded: float  # checkpoint inputs in RAM
    checkpointed: int  # blocks


def training_activations(f: registry.Flavour, plan: LowVramPlan, tokens: int, batch: int, elem: int,
                         fused_attention: bool, backend: str = "sdpa") -> Activations:
    """Bytes of activations for one forward+backward of one micro-batch under the plan's checkpointing and swap;
    `backend`: advanced.attention."""
    every = plan.checkpointing_interval if plan.gradient_checkpointing else 0
    return _activations(f, plan.blocks_to_swap, every, plan.cpu_offload_checkpointing, tokens, batch, elem,
                        fused_attention, backend)


def attention_saved_per_block(f: registry.Flavour, backend: str, tokens: int, batch: int, elem: int,
                              fused_attention: bool) -> float:
    """What one block's attention keeps for backward beyond its inputs and output, by advanced.attention."""
    if backend in LSE_BYTES:
        return LSE_BYTES[backend] * f.num_heads * tokens * batch
    return 0.0 if fused_attention else 4.0 * f.num_heads * tokens * tokens * batch * elem / 2


@functools.lru_cache(maxsize=1024)  # the suggestion search asks for the same few plans again and again
def _activations(f: registry.Flavour, blocks_to_swap: int, every: int, offload: bool, tokens: int, batch: int,
                 elem: int, fused_attention: bool, backend: str = "sdpa") -> Activations:
    total = f.total_blocks
    swapped = min(blocks_to_swap, total)
    per_token = f.hidden_size * tokens * batch
    one_block = (FP32_ACTIVATION_FACTOR if elem == 4 else ACTIVATION_FACTOR)[f.family] * per_token
    double_input = CHECKPOINT_FACTOR["double"] * per_token * elem / 2
    single_input = CHECKPOINT_FACTOR["single"] * per_token * elem / 2
    # the backward runs from the last block to the first: at block i everything saved by the blocks before it
    # is alive, plus block i's own full activations, or its recomputation when it was checkpointed (the later
    # blocks' activations are already freed); the peak is the largest of these. Running sums keep this linear
    # in the blocks.
    saved = full_before = kept = offloaded = 0.0
    checkpointed = 0
    kept_inputs: list[float] = []  # inputs of the checkpointed blocks before i that are on the GPU
    for index in range(total):
        alive = full_before + kept
        # swapped blocks (the first ones) are always checkpointed: their weights have left the ring by the backward
        if (every and index % every == 0) or index < swapped:
            checkpointed += 1
            saved = max(saved, alive + RECOMPUTE_FACTOR * one_block)
            inputs = double_input if index < f.double_blocks else single_input
            offloaded += inputs
            kept_inputs.append(inputs)
            kept += inputs
            if offload and len(kept_inputs) > OFFLOAD_KEPT_BLOCKS:
                kept -= kept_inputs.pop(0)  # the rest wait in RAM
        else:
            full_before += one_block
            saved = max(saved, alive + one_block)
    saved += NON_BLOCK_FACTOR[elem] * per_token
    # without a fused kernel the attention probabilities of every non-checkpointed block are saved for backward
    per_block = attention_saved_per_block(f, backend, tokens, batch, elem, fused_attention)
    attention = per_block * (total - checkpointed + (1 if checkpointed else 0))
    # offloaded: every checkpointed block's input passes through pinned RAM
    return Activations(saved, attention, offloaded if offload else 0.0, checkpointed)


def text_encoder_weights(shape: TextEncoderShape, precision: str) -> tuple[float, float]:
    """(bytes of one repeated layer, bytes of everything else) of a text encoder stored in `precision`. A quantised
    encoder (trainer/memory/quantize.py) stores every Linear quantised — the layers, CLIP beside T5, a vision
    tower — and keeps the token table and the norms in bf16."""
    if precision not in WEIGHT_BYTES:
        return shape.layer_params * BYTES[precision], shape.outside_params * BYTES[precision]
    table = shape.vocab * shape.hidden
    outside = table * BYTES["bf16"] + (shape.outside_params - table) * WEIGHT_BYTES[precision]
    return shape.layer_params * WEIGHT_BYTES[precision], outside


def text_encoder_memory(f: registry.Flavour, spec: JobSpec, device: str) -> tuple[float, float, float, float]:
    """(whole encoder bytes, GPU bytes while caching, of which weights, RAM bytes while caching)."""
    shape = loaded_text_encoder(f)
    if shape is None:
        return 0.0, 0.0, 0.0, 0.0
    precision = text_encoder_precision(spec.model)  # auto unresolved here: what auto holds when RAM allows
    layer, outside = text_encoder_weights(shape, precision)
    whole = shape.layers * layer + outside
    elem = 2 if precision in WEIGHT_BYTES else BYTES[precision]  # a quantised encoder computes in bf16
    tokens = text_tokens(f) * registry.TEXT_ENCODE_BATCH  # a full batch of prompts: any dataset of 8 captions
    # every layer's hidden state is returned (output_hidden_states) and a few temporaries; no logits (NoLogits)
    work = (shape.layers + 9) * shape.hidden * tokens * elem
    if precision in WEIGHT_BYTES:
        work += shape.hidden * shape.ffn * 2  # a Linear dequantised to bf16 while it computes: the widest one
    if device == "gpu":
        return whole, whole + work, whole, 0.0
    if device == "offload":
        # trainer/memory/placement.py: the layers stream through a ring of 2 slots, everything else (token table,
        # final norm, a vision tower) sits on the GPU; the layers' pinned masters stay in RAM
        on_gpu = TEXT_ENCODER_RING * layer + outside
        return whole, on_gpu + work, on_gpu, shape.layers * layer
    return whole, 0.0, 0.0, whole + work  # cpu
