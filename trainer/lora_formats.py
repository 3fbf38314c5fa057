"""LoRA files in the layouts other tools load: diffusers/PEFT, ComfyUI (original BFL names) and kohya.

`output.formats` picks any of FORMATS; each is a separate .safetensors file (see `lora_filename`):

  diffusers  `transformer.<module>.lora_A.weight` / `.lora_B.weight`, the peft config in the header
             (`lora_adapter_metadata`). Written by `trainer.checkpoint.save_lora_diffusers`; this module only
             adds the descriptive metadata (`merge_metadata`).
  comfyui    the original (BFL) module names under `diffusion_model.`, which ComfyUI matches against the
             checkpoint it has loaded. Two key styles, one per family, because that is what diffusers'
             `load_lora_weights` accepts (ComfyUI reads both):
               FLUX.2  `diffusion_model.<bfl>.lora_A.weight` / `.lora_B.weight`, NO `.alpha`: diffusers'
                       FLUX.2 BFL converter (`_convert_non_diffusers_flux2_lora_to_diffusers`) raises on any key
                       it does not consume, alphas included. The scale alpha/rank is multiplied into lora_A, and
                       both loaders apply a file without alphas at scale 1 (ComfyUI: alpha None -> 1.0;
                       diffusers: alpha = rank per module).
               FLUX.1  `diffusion_model.<bfl>.lora_down.weight` / `.lora_up.weight` / `.alpha`: diffusers' FLUX.1
                       loader ignores `diffusion_model.*.lora_A` keys altogether (no converter matches them) and
                       reads the ComfyUI layout only in kohya's down/up naming, through its kohya converter.
  kohya      FLUX.1 only: `lora_unet_<bfl path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
             (sd-scripts' networks.lora_flux layout).

Module names (per block N; "double" = diffusers `transformer_blocks.N.` / BFL `double_blocks.N.`, "single" =
`single_transformer_blocks.N.` / `single_blocks.N.`), checked against diffusers 0.42's converters and classes:

  BFL                 FLUX.2 (Flux2Transformer2DModel)            FLUX.1 (FluxTransformer2DModel)
  img_attn.qkv        attn.to_q + to_k + to_v (fused, rows q,k,v)  same
  img_attn.proj       attn.to_out.0                               same
  txt_attn.qkv        attn.add_q_proj + add_k_proj + add_v_proj   same
  txt_attn.proj       attn.to_add_out                             same
  img_mlp.0 / .2      ff.linear_in / ff.linear_out                ff.net.0.proj / ff.net.2
  txt_mlp.0 / .2      ff_context.linear_in / .linear_out          ff_context.net.0.proj / ff_context.net.2
  single linear1      attn.to_qkv_mlp_proj (already fused)        attn.to_q + to_k + to_v + proj_mlp (rows h,h,h,4h)
  single linear2      attn.to_out                                 proj_out
  img_in, txt_in      x_embedder, context_embedder                same
  time_in.in_layer/out_layer    time_guidance_embed.timestep_embedder.linear_1/_2   time_text_embed.timestep_...
  guidance_in.in_layer/out_layer time_guidance_embed.guidance_embedder.linear_1/_2  time_text_embed.guidance_...
  vector_in.in_layer/out_layer  -                                  time_text_embed.text_embedder.linear_1/_2
  final_layer.linear  proj_out                                    proj_out
The names diffusers gives after `fuse_qkv_projections()` (attn.to_qkv, attn.to_added_qkv) map to the same fused
BFL layers. AdaLN modulation Linears (norm1.linear, norm.linear, norm_out.linear, *_modulation*) have no entry:
no preset targets them, and diffusers' LoRA converters do not handle them consistently (the final one needs a
scale/shift swap), so a regex target that hits one cannot be written in these layouts.

Fusing: separate LoRAs on q, k, v (and FLUX.1's MLP-in) become one LoRA on the fused layer exactly: lora_A is
stacked ([A_q; A_k; A_v], rank 3r, or 4r with proj_mlp) and lora_B is block-diagonal; a part the adapter does
not target gets r zero rows in lora_A and a zero block in lora_B (so the fused rank is always n·r and diffusers'
kohya converter recognises the block structure and splits it back to rank r). The per-module scale alpha/r is
kept: a fused layer of rank n·r is written with alpha n·alpha. `from_comfyui` reverses all of this.

FLUX.1 surprises in diffusers 0.42's kohya converter (which also reads the FLUX.1 ComfyUI layout):
- single_blocks.N.linear1 is split with hard-coded FLUX.1 [dev] widths (3072, 3072, 3072, 12288): it loads on
  the real models, but on a narrower model (the demo) diffusers fails on any file containing linear1.
- `final_layer.linear` ignores `.alpha`: we multiply that module's scale into lora_down and write alpha = rank,
  so every loader agrees on it.
- every module outside the blocks (img_in, txt_in, time_in, guidance_in, vector_in, final_layer.linear) comes
  out of that converter without the `transformer.` prefix, so diffusers silently drops it (the block modules
  load). ComfyUI applies them. Only the FLUX.1 "all+ffs" preset (final proj_out) and regex targets reach these.

LoKr adapters: these layouts are LoRA-only; asking for them raises a UserError naming output.formats.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from trainer import registry
from trainer.errors import UserError
from trainer.files import write_atomic

if TYPE_CHECKING:
    from torch import Tensor

FORMATS = ("diffusers", "comfyui", "kohya")
FAMILIES = tuple(registry.FAMILIES)  # ("flux2", "flux1")
_SUFFIX = {"diffusers": "", "comfyui": "_comfyui", "kohya": "_kohya"}
_COMFY_PREFIX = "diffusion_model."
_KOHYA_PREFIX = "lora_unet_"
METADATA_PREFIX = "flux_lora_studio."  # our own header keys; everything else uses names other tools read


# ---------------------------------------------------------------------------------------------- name tables


@dataclass(frozen=True)
class _Group:
    """One BFL Linear and the diffusers Linear(s) whose output rows it stacks, in order.

    `parts`: (diffusers name, output rows in units of the block's width); the unit matters only for fusing.
    Non-canonical groups are alternative diffusers spellings (after fuse_qkv_projections), written but never
    produced when reading a BFL file back.
    """

    bfl: str
    parts: tuple[tuple[str, int], ...]
    canonical: bool = True


def _one(bfl: str, diffusers: str) -> _Group:
    return _Group(bfl, ((diffusers, 1),))


_ATTENTION = (
    _Group("img_attn.qkv", (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1))),
    _Group("img_attn.qkv", (("attn.to_qkv", 3),), canonical=False),
    _one("img_attn.proj", "attn.to_out.0"),
    _Group("txt_attn.qkv", (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1))),
    _Group("txt_attn.qkv", (("attn.to_added_qkv", 3),), canonical=False),
    _one("txt_attn.proj", "attn.to_add_out"),
)

_DOUBLE: dict[str, tuple[_Group, ...]] = {
    "flux2": (
        *_ATTENTION,
        _one("img_mlp.0", "ff.linear_in"), _one("img_mlp.2", "ff.linear_out"),
        _one("txt_mlp.0", "ff_context.linear_in"), _one("txt_mlp.2", "ff_context.linear_out"),
    ),
    "flux1": (
        *_ATTENTION,
        _one("img_mlp.0", "ff.net.0.proj"), _one("img_mlp.2", "ff.net.2"),
        _one("txt_mlp.0", "ff_context.net.0.proj"), _one("txt_mlp.2", "ff_context.net.2"),
    ),
}

_SINGLE: dict[str, tuple[_Group, ...]] = {
    "flux2": (_one("linear1", "attn.to_qkv_mlp_proj"), _one("linear2", "attn.to_out")),
    "flux1": (
        _Group("linear1", (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", 4))),
        _Group("linear1", (("attn.to_qkv", 3), ("proj_mlp", 4)), canonical=False),
        _one("linear2", "proj_out"),
    ),
}

_EXTRAS: dict[str, tuple[_Group, ...]] = {
    "flux2": (
        _one("img_in", "x_embedder"), _one("txt_in", "context_embedder"),
        _one("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
        _one("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
        _one("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
        _one("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
        _one("final_layer.linear", "proj_out"),
    ),
    "flux1": (
        _one("img_in", "x_embedder"), _one("txt_in", "context_embedder"),
        _one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        _one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        _one("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        _one("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        _one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        _one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        _one("final_layer.linear", "proj_out"),
    ),
}

# diffusers 0.42's FLUX.1 kohya converter applies no alpha to these: their scale goes into lora_down instead.
_ALPHA_IGNORED_BY_DIFFUSERS = {"flux1": ("final_layer.linear",), "flux2": ()}

_DOUBLE_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_SINGLE_RE = re.compile(r"single_transformer_blocks\.(\d+)\.(.+)")
_BFL_DOUBLE_RE = re.compile(r"double_blocks\.(\d+)\.(.+)")
_BFL_SINGLE_RE = re.compile(r"single_blocks\.(\d+)\.(.+)")
_KOHYA_BLOCK_RE = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def _diffusers_index(family: str) -> dict[str, list[_Group]]:
    """"scope:diffusers suffix" -> the groups it is a part of (canonical first); scope: double, single, extra."""
    index: dict[str, list[_Group]] = {}
    for scope, groups in (("double", _DOUBLE[family]), ("single", _SINGLE[family]), ("extra", _EXTRAS[family])):
        for group in groups:
            for name, _ in group.parts:
                index.setdefault(f"{scope}:{name}", []).append(group)
    return index


def _bfl_index(family: str) -> dict[str, tuple[str, _Group]]:
    """"scope:bfl suffix" -> canonical group."""
    index: dict[str, tuple[str, _Group]] = {}
    for scope, groups in (("double", _DOUBLE[family]), ("single", _SINGLE[family]), ("extra", _EXTRAS[family])):
        for group in groups:
            if group.canonical:
                index[f"{scope}:{group.bfl}"] = (scope, group)
    return index


_BLOCK_PREFIXES = {"bfl": ("double_blocks", "single_blocks"),
                   "diffusers": ("transformer_blocks", "single_transformer_blocks")}


def _in_block(layout: str, scope: str, block: str | None, name: str) -> str:
    """`name` inside block `block` of `scope` (double / single / extra) in the BFL or diffusers layout."""
    if scope == "extra":
        return name
    double, single = _BLOCK_PREFIXES[layout]
    return f"{double if scope == 'double' else single}.{block}.{name}"


# ---------------------------------------------------------------------------------------------- checks


def lora_filename(name: str, format: str, step: int | None = None) -> str:
    """`<name>.safetensors`, `<name>_comfyui.safetensors`, `<name>_kohya.safetensors`; with a step (intermediate
    saves) `<name>-step000100<suffix>.safetensors`."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; known: {', '.join(FORMATS)}")
    stem = f"{name}-step{step:06d}" if step is not None else name
    return f"{stem}{_SUFFIX[format]}.safetensors"


# ---------------------------------------------------------------------------------------------- diffusers -> BFL


def _scope_of(name: str, single: re.Pattern[str], double: re.Pattern[str]) -> tuple[str, str | None, str]:
    """(single | double | extra, block number, name inside the block) of a module name in either layout."""
    if match := single.fullmatch(name):
        return "single", match.group(1), match.group(2)
    if match := double.fullmatch(name):
        return "double", match.group(1), match.group(2)
    return "extra", None, name


def _split_adapter_keys(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module: {"A": lora_A, "B": lora_B}} from `<module>.lora_A.weight` keys (a `transformer.` prefix is dropped)."""
    modules: dict[str, dict[str, Tensor]] = {}
    lokr = [key for key in tensors if ".lokr_" in key]
    if lokr:
        raise UserError("output.formats: 'comfyui' and 'kohya' hold LoRA (A/B) weights only and this adapter is a "
                        f"LoKr ({lokr[0]}); write it in 'diffusers' format only, or train lora.type = 'lora'")
    for key, value in tensors.items():
        name = key.removeprefix("transformer.")
        for part, suffix in (("A", ".lora_A.weight"), ("B", ".lora_B.weight")):
            if name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[part] = value
                break
        else:
            raise ValueError(f"not a LoRA tensor name: {key!r} (expected <module>.lora_A.weight / .lora_B.weight)")
    for module, parts in modules.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} lacks lora_{'B' if 'A' in parts else 'A'}.weight")
    return modules


def _fuse(group: _Group, present: dict[int, dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stacked lora_A and block-diagonal lora_B of a fused layer; untargeted parts contribute zero blocks."""
    import torch

    first = present[min(present)]
    dtype, device = first["A"].dtype, first["A"].device
    in_features = first["A"].shape[1]
    pad_rank = first["A"].shape[0]
    unit, remainder = divmod(first["B"].shape[0], group.parts[min(present)][1])
    if remainder:
        raise ValueError(f"{group.parts[min(present)][0]}: {first['B'].shape[0]} output rows do not fit the fused "
                         f"layer {group.bfl}")
    ranks = [present[i]["A"].shape[0] if i in present else pad_rank for i in range(len(group.parts))]
    rows = [present[i]["B"].shape[0] if i in present else units * unit for i, (_, units) in enumerate(group.parts)]
    a = torch.zeros(sum(ranks), in_features, dtype=dtype, device=device)
    b = torch.zeros(sum(rows), sum(ranks), dtype=dtype, device=device)
    row = col = 0
    for i in range(len(group.parts)):
        if i in present:
            if present[i]["A"].shape[1] != in_features:
                raise ValueError(f"{group.bfl}: its parts take different input widths")
            a[col:col + ranks[i]] = present[i]["A"]
            b[row:row + rows[i], col:col + ranks[i]] = present[i]["B"]
        row += rows[i]
        col += ranks[i]
    return a, b


def _to_bfl(family: str, tensors: dict[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """(BFL module name, lora_A, lora_B) per BFL Linear, sorted by name; fused where the BFL layer is fused."""
    _check_family(family)
    index = _diffusers_index(family)
    found: dict[str, tuple[list[_Group], dict[str, dict[str, Tensor]]]] = {}
    unmapped: list[str] = []
    for module, parts in _split_adapter_keys(tensors).items():
        scope, block, suffix = _scope_of(module, _SINGLE_RE, _DOUBLE_RE)
        groups = index.get(f"{scope}:{suffix}")
        if groups is None:
            unmapped.append(module)
            continue
        bfl = _in_block("bfl", scope, block, groups[0].bfl)
        known, by_name = found.setdefault(bfl, ([], {}))
        known.extend(g for g in groups if g not in known)
        by_name[suffix] = parts
    if unmapped:
        kind = ("AdaLN modulation layers, which " if any("norm" in m or "modulation" in m for m in unmapped)
                else "layers that ")
        raise UserError(f"output.formats: the adapter wraps {kind}the ComfyUI/kohya layouts have no name for "
                        f"({', '.join(sorted(unmapped)[:3])}{', ...' if len(unmapped) > 3 else ''}); narrow "
                        "lora.targets (the presets never hit them) or write only 'diffusers'")
    result = []
    for bfl in sorted(found):
        candidates, by_name = found[bfl]
        fitting = [g for g in candidates if set(by_name) <= {name for name, _ in g.parts}]
        if not fitting:
            raise ValueError(f"{bfl}: the adapter holds both fused and separate diffusers layers for it "
                             f"({', '.join(sorted(by_name))})")
        group = fitting[0]
        present = {i: by_name[name] for i, (name, _) in enumerate(group.parts) if name in by_name}
        if len(group.parts) == 1:
            result.append((bfl, present[0]["A"], present[0]["B"]))
        else:
            result.append((bfl, *_fuse(group, present)))
    return result


def _scalar(value: float) -> Tensor:
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def _down_up_alpha(family: str, tensors: dict[str, Tensor], alpha: float, rank: int,
                   prefix: str, underscores: bool) -> dict[str, Tensor]:
    scale = float(alpha) / float(rank)
    out: dict[str, Tensor] = {}
    for bfl, a, b in _to_bfl(family, tensors):
        fused_rank = a.shape[0]
        if bfl in _ALPHA_IGNORED_BY_DIFFUSERS[family]:
            a, module_alpha = a * scale, float(fused_rank)
        else:
            module_alpha = scale * fused_rank
        name = prefix + (bfl.replace(".", "_") if underscores else bfl)
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = b.contiguous()
        out[f"{name}.alpha"] = _scalar(module_alpha)
    return out


def to_comfyui(family: str, tensors: dict[str, Tensor], alpha: float, rank: int) -> dict[str, Tensor]:
    """The adapter (`adapter_export` tensors; `alpha`, `rank` from its config) in ComfyUI's BFL layout.

    FLUX.2: `diffusion_model.<bfl>.lora_A.weight` / `.lora_B.weight`, scale folded into lora_A, no alphas.
    FLUX.1: `diffusion_model.<bfl>.lora_down.weight` / `.lora_up.weight` / `.alpha` (see the module docstring).
    """
    _check_family(family)
    if family == "flux1":
        return _down_up_alpha(family, tensors, alpha, rank, _COMFY_PREFIX, underscores=False)
    scale = float(alpha) / float(rank)
    out: dict[str, Tensor] = {}
    for bfl, a, b in _to_bfl(family, tensors):
        out[f"{_COMFY_PREFIX}{bfl}.lora_A.weight"] = (a * scale).contiguous()
        out[f"{_COMFY_PREFIX}{bfl}.lora_B.weight"] = b.contiguous()
    return out


def to_kohya(tensors: dict[str, Tensor], alpha: float, rank: int, *, family: str = "flux1") -> dict[str, Tensor]:
    """The adapter in kohya sd-scripts' FLUX.1 layout: `lora_unet_<bfl path with _>.lora_down/.lora_up/.alpha`."""
    if family != "flux1":  # the spec allows kohya for FLUX.1 jobs only (JobSpec._sections_agree)
        raise ValueError(f"the kohya layout is FLUX.1's, not {family}'s")
    return _down_up_alpha(family, tensors, alpha, rank, _KOHYA_PREFIX, underscores=True)


# ---------------------------------------------------------------------------------------------- BFL -> diffusers


def _bfl_name(family: str, key_module: str) -> str:
    """Dotted BFL module name from a ComfyUI (`diffusion_model.` dotted) or kohya (`lora_unet_` underscored) name."""
    if key_module.startswith(_COMFY_PREFIX):
        return key_module.removeprefix(_COMFY_PREFIX)
    if not key_module.startswith(_KOHYA_PREFIX):
        return key_module
    flat = key_module.removeprefix(_KOHYA_PREFIX)
    if match := _KOHYA_BLOCK_RE.fullmatch(flat):
        scope = "double" if match.group(1) == "double_blocks" else "single"
        groups = _DOUBLE[family] if scope == "double" else _SINGLE[family]
        for group in groups:
            if group.bfl.replace(".", "_") == match.group(3):
                return _in_block("bfl", scope, match.group(2), group.bfl)
        return flat
    for group in _EXTRAS[family]:
        if group.bfl.replace(".", "_") == flat:
            return group.bfl
    return flat


def _split_fused(group: _Group, a: Tensor, b: Tensor) -> list[tuple[str, Tensor, Tensor]]:
    """The fused layer's LoRA as one LoRA per diffusers part, with the same ΔW per part."""
    count = len(group.parts)
    units = sum(u for _, u in group.parts)
    unit, remainder = divmod(b.shape[0], units)
    if remainder:
        raise UserError(f"{group.bfl}: lora_B has {b.shape[0]} rows, not a multiple of {units}; is this a LoRA of "
                        "this model family?")
    bounds, row = [], 0
    for _, u in group.parts:
        bounds.append((row, row + u * unit))
        row += u * unit
    rank = a.shape[0]
    block_diagonal = rank % count == 0
    if block_diagonal:
        r = rank // count
        for i, (start, stop) in enumerate(bounds):
            off = [b[start:stop, j * r:(j + 1) * r] for j in range(count) if j != i]
            if any(bool(block.any()) for block in off):
                block_diagonal = False
                break
    parts = []
    for i, ((name, _), (start, stop)) in enumerate(zip(group.parts, bounds, strict=True)):
        if block_diagonal:
            part_a, part_b = a[i * r:(i + 1) * r], b[start:stop, i * r:(i + 1) * r]
            if not part_a.any() and not part_b.any():
                continue  # a part the adapter did not target (zero padding)
        else:
            part_a, part_b = a, b[start:stop]
        parts.append((name, part_a.contiguous().clone(), part_b.contiguous().clone()))
    return parts


def from_comfyui(family: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ComfyUI/BFL (or kohya) LoRA as diffusers module names: `<module>.lora_A.weight` / `.lora_B.weight`.

    Reads `diffusion_model.<bfl>` and `lora_unet_<bfl with _>` keys, lora_A/lora_B or lora_down/lora_up, with or
    without `.alpha`. Each module's scale alpha/rank is multiplied into lora_A, so the result applies at scale 1
    (load it with alpha = rank per module): ΔW = lora_B @ lora_A. Fused layers are split back onto q, k, v (and
    FLUX.1's proj_mlp): exactly to rank r per part when lora_B is block-diagonal (as `to_comfyui` writes it),
    otherwise each part gets the whole lora_A and its rows of lora_B (the same ΔW at the fused rank).
    """
    _check_family(family)
    index = _bfl_index(family)
    label = registry.FAMILIES[family].label
    modules: dict[str, dict[str, Tensor]] = {}
    suffixes = (("A", ".lora_A.weight"), ("B", ".lora_B.weight"), ("A", ".lora_down.weight"),
                ("B", ".lora_up.weight"), ("alpha", ".alpha"))
    for key, value in tensors.items():
        for part, suffix in suffixes:
            if key.endswith(suffix):
                modules.setdefault(_bfl_name(family, key.removesuffix(suffix)), {})[part] = value
                break
        else:
            raise UserError(f"not a LoRA in ComfyUI/kohya layout: unexpected key {key!r}")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for bfl, parts in sorted(modules.items()):
        if "A" not in parts or "B" not in parts:
            raise UserError(f"LoRA module {bfl!r} lacks its {'up/B' if 'A' in parts else 'down/A'} weight")
        scope, block, suffix = _scope_of(bfl, _BFL_SINGLE_RE, _BFL_DOUBLE_RE)
        entry = index.get(f"{scope}:{suffix}")
        if entry is None:
            unknown.append(bfl)
            continue
        group = entry[1]
        a, b = parts["A"], parts["B"]
        if "alpha" in parts:
            scale = float(parts["alpha"].item()) / a.shape[0]
            if scale != 1.0:
                a = a * scale
        split = ([(group.parts[0][0], a, b)] if len(group.parts) == 1 else _split_fused(group, a, b))
        for name, part_a, part_b in split:
            module = _in_block("diffusers", scope, block, name)
            out[f"{module}.lora_A.weight"] = part_a.contiguous()
            out[f"{module}.lora_B.weight"] = part_b.contiguous()
    if unknown:
        raise UserError(f"not a {label} LoRA this trainer can read: no {label} layer is named "
                        f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}")
    return out


# ---------------------------------------------------------------------------------------------- metadata


def _architecture(family: str, flavour: str) -> str:
    """modelspec.architecture as kohya's sai_model_spec spells FLUX ("flux-1-dev/lora"), FLUX.2 by analogy."""
    names = {
        "flux1": {"dev": "flux-1-dev", "schnell": "flux-1-schnell", "krea": "flux-1-krea-dev",
                  "kontext": "flux-1-kontext-dev"},
        "flux2": {"dev": "flux-2-dev", "klein-base-9b": "flux-2-klein-base-9b",
                  "klein-base-4b": "flux-2-klein-base-4b"},
    }
    base = names[family].get(flavour, "flux-1" if family == "flux1" else "flux-2")
    return f"{base}/lora"


def build_metadata(*, family: str, flavour: str, rank: int, alpha: float, steps: int, trigger_words: list[str],
                   base_model: str, spec_toml: str, format: str, title: str = "", resolution: int | None = None,
                   created: datetime | None = None) -> dict[str, str]:
    """safetensors header entries (all str) describing the LoRA, in the names other tools read.

    kohya sd-scripts (read by ComfyUI/A1111 LoRA managers, Civitai): ss_network_dim (training rank),
    ss_network_alpha, ss_steps (optimiser steps when saved), ss_base_model_version ("flux1"/"flux2"),
    ss_sd_model_name (the base model), ss_output_name, ss_network_module (FLUX.1 only: networks.lora_flux).
    ModelSpec 1.0.1 (Stability's spec, written by sd-scripts): modelspec.sai_model_spec, .architecture
    ("flux-1-dev/lora", "flux-2-klein-base-9b/lora", ...), .implementation (BFL's repo for the ComfyUI/kohya
    layouts, "diffusers" for the diffusers one), .title, .date, .trigger_phrase (comma-separated), .resolution.
    ai-toolkit: training_info = {"step": N}. "format": "pt" is the safetensors convention for torch files.
    Ours: flux_lora_studio.{lora_format, family, flavour, spec} — `spec` is the job's TOML.
    ss_network_dim/alpha are the training rank and alpha: a ComfyUI/kohya file's fused qkv/linear1 layers have
    rank n·rank and alpha n·alpha (same scale); a FLUX.2 ComfyUI file carries no alphas (scale folded in).
    """
    _check_family(family)
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; known: {', '.join(FORMATS)}")
    when = (created or datetime.now(UTC)).replace(microsecond=0)
    implementation = ("diffusers" if format == "diffusers" else
                      "https://github.com/black-forest-labs/flux" if family == "flux1" else
                      "https://github.com/black-forest-labs/flux2")
    title = title or f"{registry.FAMILIES[family].label} {flavour} LoRA"
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _architecture(family, flavour),
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": when.isoformat(),
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_steps": str(int(steps)),
        "ss_base_model_version": family,
        "ss_sd_model_name": base_model,
        "ss_output_name": title,
        "training_info": json.dumps({"step": int(steps)}),
        f"{METADATA_PREFIX}lora_format": format,
        f"{METADATA_PREFIX}family": family,
        f"{METADATA_PREFIX}flavour": flavour,
        f"{METADATA_PREFIX}spec": spec_toml,
    }
    if family == "flux1":
        meta["ss_network_module"] = "networks.lora_flux"
    words = [w.strip() for w in trigger_words if w.strip()]
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    if resolution:
        meta["modelspec.resolution"] = f"{int(resolution)}x{int(resolution)}"
    return meta


# ---------------------------------------------------------------------------------------------- files


def _check_metadata(metadata: dict[str, str]) -> None:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; not so for {bad[:3]}")


def write_lora(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Save `tensors` with `metadata` as a .safetensors file, atomically (never a torn file)."""
    from safetensors.torch import save_file

    _check_metadata(metadata)
    ready: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()  # safetensors refuses tensors that share memory
        if value.numel():
            seen.add(value.untyped_storage().data_ptr())
        ready[key] = value
    write_atomic(Path(path), lambda tmp: save_file(ready, str(tmp), metadata=dict(metadata)))


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the header metadata of a .safetensors LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a .safetensors file, without reading its tensors; ValueError when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a torn or foreign file
        raise ValueError(f"{Path(path).name}: not a readable safetensors file ({exc})") from None


def merge_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Add `metadata` to an existing .safetensors file's header (keeping what it has, e.g. diffusers'
    lora_adapter_metadata, unless `metadata` names the same key), rewriting the file atomically."""
    _check_metadata(metadata)
    tensors, existing = read_lora(path)
    write_lora(path, tensors, {**existing, **metadata})


def copy_to_comfy_loras(path: str | Path, comfy_lora_dir: str | Path) -> Path:
    """Copy the LoRA file into ComfyUI's loras folder (same file name, replacing an older copy), atomically."""
    source = Path(path)
    folder = Path(comfy_lora_dir).expanduser()
    where = f"output.comfy_lora_dir: '{comfy_lora_dir}'"
    if not folder.exists():
        raise UserError(f"{where} does not exist; point it at ComfyUI's models/loras folder (or leave it empty)")
    if not folder.is_dir():
        raise UserError(f"{where} is a file, not a folder; point it at ComfyUI's models/loras folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{where} is not writable by this user; fix its permissions or choose another folder")
    target = folder / source.name
    try:
        write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))
    except OSError as exc:
        raise UserError(f"{where}: could not copy {source.name} there ({exc})") from None
    return target
