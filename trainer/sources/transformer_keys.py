"""The FLUX transformers' original (BFL) tensor names and rows, against diffusers', in both directions.

Every diffusers tensor is a concatenation, along its first dimension, of row ranges of BFL tensors (a `Piece`):
most are one whole tensor renamed; fused BFL layers are split by rows (double blocks' `img_attn.qkv` into
to_q/to_k/to_v; FLUX.1's single `linear1` into to_q/to_k/to_v/proj_mlp, widths h, h, h, mlp); the final AdaLN
modulation is stored (shift, scale) by BFL and (scale, shift) by diffusers, i.e. its two halves swapped. A plan
of pieces therefore converts either way exactly, and lets a loader read each diffusers weight straight from
the file a slice of rows at a time (no converted copy of the whole checkpoint). Names checked against
diffusers 0.42's `convert_flux2_transformer_checkpoint_to_diffusers` and `convert_flux_transformer_...`
(tests compare with the FLUX.2 one; FLUX.1's hard-codes FLUX.1 [dev]'s widths so it cannot read the demo).

Torch is only needed by the whole-dict conversions at the bottom (tests and export); plans are plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

BFL_PREFIX = "model.diffusion_model."  # how BFL's and ComfyUI's full checkpoints store the transformer


@dataclass(frozen=True)
class Piece:
    """Rows start..stop-1 of the BFL tensor `key`."""

    key: str
    start: int
    stop: int


Plan = dict[str, tuple[Piece, ...]]  # diffusers tensor name -> its pieces, in row order

# (BFL module, diffusers modules whose rows it stacks in order); names without the `.weight`/`.bias` suffix.
_Rule = tuple[str, tuple[str, ...]]

_ATTENTION: tuple[_Rule, ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.proj", ("attn.to_add_out",)),
)
# RMSNorm scales: BFL `<module>.scale`, diffusers `<module>.weight`.
_DOUBLE_NORMS = (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                 ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k"))
_SINGLE_NORMS = (("norm.query_norm", "attn.norm_q"), ("norm.key_norm", "attn.norm_k"))

_DOUBLE: dict[str, tuple[_Rule, ...]] = {
    "flux2": (*_ATTENTION, ("img_mlp.0", ("ff.linear_in",)), ("img_mlp.2", ("ff.linear_out",)),
              ("txt_mlp.0", ("ff_context.linear_in",)), ("txt_mlp.2", ("ff_context.linear_out",))),
    "flux1": (*_ATTENTION, ("img_mlp.0", ("ff.net.0.proj",)), ("img_mlp.2", ("ff.net.2",)),
              ("txt_mlp.0", ("ff_context.net.0.proj",)), ("txt_mlp.2", ("ff_context.net.2",)),
              ("img_mod.lin", ("norm1.linear",)), ("txt_mod.lin", ("norm1_context.linear",))),
}
_SINGLE: dict[str, tuple[_Rule, ...]] = {
    "flux2": (("linear1", ("attn.to_qkv_mlp_proj",)), ("linear2", ("attn.to_out",))),
    "flux1": (("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), ("linear2", ("proj_out",)),
              ("modulation.lin", ("norm.linear",))),
}
_GLOBAL: dict[str, tuple[_Rule, ...]] = {
    "flux2": (
        ("img_in", ("x_embedder",)), ("txt_in", ("context_embedder",)),
        ("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
        ("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
        ("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
        ("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
        ("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
        ("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
        ("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
        ("final_layer.linear", ("proj_out",)),
    ),
    "flux1": (
        ("img_in", ("x_embedder",)), ("txt_in", ("context_embedder",)),
        ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
        ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        ("final_layer.linear", ("proj_out",)),
    ),
}
_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) <-> (scale, shift)


def _blocks(shapes: dict[str, tuple[int, ...]], stem: str) -> int:
    found = {int(name[len(stem):].split(".", 1)[0]) for name in shapes if name.startswith(stem)}
    return max(found) + 1 if found else 0


def transformer_plan(family: str, shapes: dict[str, tuple[int, ...]]) -> Plan:
    """The BFL pieces of every tensor of a diffusers FLUX transformer whose tensor shapes are `shapes`
    (its state dict's names and shapes, e.g. of a model built on the meta device)."""
    rules: list[tuple[str, str, tuple[str, ...]]] = []  # (BFL module, diffusers prefix, diffusers modules)
    norms: list[tuple[str, str]] = []
    for index in range(_blocks(shapes, "transformer_blocks.")):
        bfl, ours = f"double_blocks.{index}.", f"transformer_blocks.{index}."
        rules += [(bfl + b, ours, parts) for b, parts in _DOUBLE[family]]
        norms += [(bfl + b, ours + d) for b, d in _DOUBLE_NORMS]
    for index in range(_blocks(shapes, "single_transformer_blocks.")):
        bfl, ours = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
        rules += [(bfl + b, ours, parts) for b, parts in _SINGLE[family]]
        norms += [(bfl + b, ours + d) for b, d in _SINGLE_NORMS]
    rules += [(b, "", parts) for b, parts in _GLOBAL[family]]

    plan: Plan = {}
    for bfl, prefix, parts in rules:
        for suffix in ("weight", "bias"):
            names = [f"{prefix}{part}.{suffix}" for part in parts]
            if not all(name in shapes for name in names):
                continue  # this model has no such tensor (FLUX.2 has no biases; klein no guidance embedder)
            start = 0
            for name in names:
                stop = start + shapes[name][0]
                plan[name] = (Piece(f"{bfl}.{suffix}", start, stop),)
                start = stop
    for bfl, ours in norms:
        if f"{ours}.weight" in shapes:
            plan[f"{ours}.weight"] = (Piece(f"{bfl}.scale", 0, shapes[f"{ours}.weight"][0]),)
    bfl, ours = _SWAPPED
    for suffix in ("weight", "bias"):
        if f"{ours}.{suffix}" in shapes:
            rows = shapes[f"{ours}.{suffix}"][0]
            key = f"{bfl}.{suffix}"
            plan[f"{ours}.{suffix}"] = (Piece(key, rows // 2, rows), Piece(key, 0, rows // 2))
    unplanned = sorted(set(shapes) - set(plan))
    if unplanned:
        raise ValueError(f"no BFL name for {len(unplanned)} {family} transformer tensors, e.g. {unplanned[:3]}")
    return plan


def identity_plan(shapes: dict[str, tuple[int, ...]]) -> Plan:
    """The plan of a file already in diffusers layout: every tensor is itself, whole."""
    return {name: (Piece(name, 0, shape[0] if shape else 1),) for name, shape in shapes.items()}


def bfl_shapes(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shape every BFL tensor of a plan has (rows: the largest stop; other dimensions from diffusers)."""
    result: dict[str, tuple[int, ...]] = {}
    for name, pieces in plan.items():
        for piece in pieces:
            rows = max(piece.stop, result.get(piece.key, (0,))[0])
            result[piece.key] = (rows, *shapes[name][1:])
    return result
