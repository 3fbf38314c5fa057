"""What a .safetensors file holds, told from its header alone (tensor names, dtypes and shapes; no torch).

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every tensor's
dtype, shape and byte range, so reading it costs one small read however large the file is: the UI lists a
ComfyUI models/ folder with it and the preflight checks refuse a file in the wrong slot before anything loads.

How each kind is recognised (after stripping a prefix such as `model.diffusion_model.`):

  FLUX.2 transformer  `double_stream_modulation_img.lin` (BFL) / `.linear` (diffusers): shared modulation
  FLUX.1 transformer  `vector_in` (BFL) / `time_text_embed.text_embedder` (diffusers): the pooled CLIP input
      flavour by hidden size (img_in rows), double and single block counts and the guidance embedder
      (FLUX.2 dev 6144, 8+48, guidance; klein 9B 4096, 8+24; klein 4B 3072, 5+20; FLUX.1 3072, 19+38, with
      guidance_in for dev/krea/kontext, without for schnell)
  VAE                 `decoder.conv_in.weight` (its input channels are the latent channels: 16 FLUX.1, 32 FLUX.2);
                      FLUX.2 also has `bn.running_mean` (the latent BatchNorm)
  Qwen3               `model.layers.0.self_attn.q_norm.weight` (Qwen3's q/k norms); 4B: hidden 2560, 8B: 4096
  Mistral             `model.layers.0.post_attention_layernorm.weight` without q_norm, hidden 5120
  CLIP                `(text_model.)encoder.layers.0.mlp.fc1.weight`; CLIP-L: 12 layers of 768
  T5                  `encoder.block.0.layer.0.SelfAttention.q.weight`; T5-XXL: d_model 4096, 24 blocks

These are the markers ComfyUI's own model detection uses, so a file ComfyUI loads is recognised here.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from trainer import registry
from trainer.regular_files import open_regular
from trainer.sources.architecture import Architecture, fitting, mismatch

_MAX_HEADER = 100 * 1024 * 1024  # a real header is a few MB at most; larger means this is not safetensors
# Keys of quantisation side data (ComfyUI's scaled fp8 and mixed formats, BFL's fp8 releases): not weights.
QUANT_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant",
                  ".weight_scale_2")
_QUANT_MARKERS = ("scaled_fp8",)


class NotSafetensors(ValueError):
    """The file cannot be read as safetensors; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors names: BF16, F16, F32, F8_E4M3, F8_E5M2, U8, ...
    shape: tuple[int, ...]


def read_raw_header(path: str | Path) -> dict[str, object]:
    """The file's JSON header as stored (`__metadata__` included), after checking the tensors' bytes are all there."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open_regular(path) as handle:  # a FIFO named like a LoRA or model file would block a plain open
            raw = handle.read(8)
            if len(raw) < 8:
                raise NotSafetensors("the file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                raise NotSafetensors("its first bytes are not a safetensors header length")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotSafetensors(getattr(exc, "strerror", None) or str(exc)) from None
    if not isinstance(header, dict):
        raise NotSafetensors("its header is not a table of tensors")
    try:
        needed = max((int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"),
                     default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise NotSafetensors("its header is not a table of tensors") from None
    if 8 + length + needed > size:  # an interrupted download or copy: the header survives, the weights do not
        raise NotSafetensors(f"the file is truncated: its tensors need {8 + length + needed:,} bytes and it holds "
                             f"{size:,}; download or copy it again")
    return header


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor name -> dtype and shape, from the file's JSON header (its `__metadata__` left out)."""
    header = read_raw_header(path)
    return {name: TensorInfo(str(info["dtype"]), tuple(int(n) for n in info["shape"]))
            for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}


@dataclass(frozen=True)
class Recognised:
    """What a file holds. `kind`: transformer, vae, qwen3, mistral, clip, t5 or unknown."""

    kind: str
    label: str  # for people: "FLUX.2 [klein] 4B transformer (BFL layout, fp8 e4m3)"
    family: str = ""  # flux2 / flux1 for transformers and VAEs
    flavours: tuple[str, ...] = ()  # the registry flavours a transformer fits
    layout: str = ""  # transformer and VAE: "bfl" or "diffusers"; text encoders: "hf"
    prefix: str = ""  # stripped from every key before the names above apply
    hidden_size: int = 0  # transformer hidden size, text encoder width, VAE latent channels
    layers: int = 0  # text encoder layers
    double_blocks: int = 0
    single_blocks: int = 0
    guidance: bool = False
    fp8: str = ""  # "e4m3" / "e5m2" when the weights are stored in fp8
    scaled: bool = False  # fp8 with scales (ComfyUI scaled_fp8 / weight_scale)
    packed: str = ""  # the dtype of weights stored in a packed format this trainer cannot read (U8, I8, ...)
    architecture: Architecture | None = None  # transformers: what their header shapes say they are built as


_TEXT_KINDS = ("qwen3", "mistral", "clip", "t5")
_KIND_NOUN = {"transformer": "a transformer", "vae": "a VAE", "qwen3": "a Qwen3 text encoder",
              "mistral": "a Mistral text encoder", "clip": "a CLIP text encoder", "t5": "a T5 text encoder",
              "unknown": "not a FLUX component"}


def _find_prefix(keys: list[str], marker: str) -> str | None:
    for key in keys:
        if key.endswith(marker):
            return key[: -len(marker)]
    return None


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def _fp8(infos: dict[str, TensorInfo]) -> tuple[str, bool]:
    dtypes = {info.dtype for name, info in infos.items() if name.endswith(".weight")}
    kind = "e4m3" if "F8_E4M3" in dtypes else "e5m2" if "F8_E5M2" in dtypes else ""
    scaled = any(name.endswith((".scale_weight", ".weight_scale")) for name in infos)
    return kind, scaled


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _packed(infos: dict[str, TensorInfo]) -> str:
    """The first non-float dtype among the weights (a packed 4-bit or GGUF-style layout), '' when all are floats."""
    return next((info.dtype for name, info in sorted(infos.items())
                 if name.endswith(".weight") and info.dtype not in _FLOAT_DTYPES), "")


def _storage(layout: str, fp8: str, scaled: bool) -> str:
    parts = [f"{layout} layout"] if layout else []
    if fp8:
        parts.append(f"fp8 {fp8}" + (" with scales" if scaled else ""))
    return f" ({', '.join(parts)})" if parts else ""


def _dims(infos: dict[str, TensorInfo], key: str) -> tuple[int, int]:
    """A linear layer's (out, in) features from its weight's shape; zeros when the header lacks it."""
    shape = infos[key].shape if key in infos else ()
    return (shape[0], shape[1]) if len(shape) == 2 else (0, 0)


def _transformer(keys: list[str], infos: dict[str, TensorInfo]) -> Recognised | None:
    for family, marker, layout in (
        ("flux2", "double_stream_modulation_img.lin.weight", "bfl"),
        ("flux2", "double_stream_modulation_img.linear.weight", "diffusers"),
        ("flux1", "vector_in.in_layer.weight", "bfl"),
        ("flux1", "time_text_embed.text_embedder.linear_1.weight", "diffusers"),
    ):
        prefix = _find_prefix(keys, marker)
        if prefix is None:
            continue
        p = re.escape(prefix)
        if layout == "bfl":
            img_in, txt_in, double, single = "img_in.weight", "txt_in.weight", r"double_blocks\.(\d+)\.", \
                r"single_blocks\.(\d+)\."
            norm = "double_blocks.0.img_attn.norm.query_norm.scale"
            guidance = prefix + "guidance_in.in_layer.weight" in infos
        else:
            img_in, txt_in, double, single = "x_embedder.weight", "context_embedder.weight", \
                r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
            norm = "transformer_blocks.0.attn.norm_q.weight"
            embedder = "time_guidance_embed" if family == "flux2" else "time_text_embed"
            guidance = f"{prefix}{embedder}.guidance_embedder.linear_1.weight" in infos
        hidden, in_channels = _dims(infos, prefix + img_in)
        _, joint = _dims(infos, prefix + txt_in)
        head_dim = infos[prefix + norm].shape[0] if prefix + norm in infos else 0
        double_blocks, single_blocks = _count(keys, p + double), _count(keys, p + single)
        arch = Architecture(family, double_blocks, single_blocks, hidden, hidden // head_dim if head_dim else 0,
                            joint, guidance, in_channels)
        flavours = tuple(f.name for f in fitting(arch) if f.family == family)
        fp8, scaled = _fp8(infos)
        name = registry.get_flavour(family, flavours[0]).label if flavours else registry.FAMILIES[family].label
        # klein base and the distilled klein share one architecture: the file cannot tell which it is
        name = name.replace("[klein] base", "[klein]")
        if len(flavours) > 1:  # FLUX.1 dev, krea and kontext share one architecture
            name = f"{registry.FAMILIES[family].label} {'/'.join(flavours)}"
        shape = f"hidden {hidden}, {double_blocks} double + {single_blocks} single blocks"
        return Recognised("transformer", f"{name} transformer{_storage(layout, fp8, scaled)} [{shape}]",
                          family=family, flavours=flavours, layout=layout, prefix=prefix, hidden_size=hidden,
                          double_blocks=double_blocks, single_blocks=single_blocks, guidance=guidance, fp8=fp8,
                          scaled=scaled, architecture=arch)
    return None


def _vae(keys: list[str], infos: dict[str, TensorInfo]) -> Recognised | None:
    prefix = _find_prefix(keys, "decoder.conv_in.weight")
    if prefix is None:
        return None
    latent = infos[prefix + "decoder.conv_in.weight"].shape[1]
    has_bn = prefix + "bn.running_mean" in infos
    layout = "diffusers" if any(k.startswith(prefix + "decoder.up_blocks.") for k in keys) else "bfl"
    family = "flux2" if has_bn or latent == 32 else "flux1" if latent == 16 else ""
    name = {"flux2": "FLUX.2 VAE", "flux1": "FLUX.1 VAE"}.get(family, f"a {latent}-channel VAE (not FLUX)")
    fp8, scaled = _fp8(infos)
    return Recognised("vae", f"{name}{_storage(layout, fp8, scaled)} [{latent} latent channels]", family=family,
                      layout=layout, prefix=prefix, hidden_size=latent, fp8=fp8, scaled=scaled)


_QWEN3_NAMES = {2560: "Qwen3-4B", 4096: "Qwen3-8B", 2048: "Qwen3-2B", 1024: "Qwen3-0.6B"}
_CLIP_NAMES = {768: "CLIP-L", 1024: "CLIP-H", 1280: "CLIP-G"}


def _clip(keys: list[str], infos: dict[str, TensorInfo]) -> Recognised | None:
    # ComfyUI and transformers 4 name it `text_model.encoder...`, transformers 5's CLIPTextModel `encoder...`
    prefix = _find_prefix(keys, "encoder.layers.0.mlp.fc1.weight")
    if prefix is None:
        return None
    width = infos[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[1]
    layers = _count(keys, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    fp8, scaled = _fp8(infos)
    return Recognised("clip", f"{_CLIP_NAMES.get(width, 'CLIP')} text encoder{_storage('', fp8, scaled)} [{layers} "
                      f"layers of {width}]", layout="hf", prefix=prefix, hidden_size=width, layers=layers, fp8=fp8,
                      scaled=scaled, packed=_packed(infos))


def _t5(keys: list[str], infos: dict[str, TensorInfo]) -> Recognised | None:
    prefix = _find_prefix(keys, "encoder.block.0.layer.0.SelfAttention.q.weight")
    if prefix is None:
        return None
    width = infos[prefix + "encoder.block.0.layer.0.SelfAttention.q.weight"].shape[1]
    layers = _count(keys, re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    fp8, scaled = _fp8(infos)
    return Recognised("t5", f"{'T5-XXL' if width == 4096 else 'T5'} text encoder{_storage('', fp8, scaled)} "
                      f"[{layers} blocks of {width}]", layout="hf", prefix=prefix, hidden_size=width, layers=layers,
                      fp8=fp8, scaled=scaled, packed=_packed(infos))


def _decoder(keys: list[str], infos: dict[str, TensorInfo]) -> Recognised | None:
    """Llama-type decoders: `model.layers.N` (ComfyUI, Qwen3ForCausalLM), `model.language_model.layers.N`
    (transformers 5's Mistral3ForConditionalGeneration) or `language_model.model.layers.N` (older saves)."""
    for marker in ("model.language_model.layers.0.post_attention_layernorm.weight",
                   "language_model.model.layers.0.post_attention_layernorm.weight",
                   "model.layers.0.post_attention_layernorm.weight"):
        prefix = _find_prefix(keys, marker)
        if prefix is None:
            continue
        stem = prefix + marker.removesuffix("0.post_attention_layernorm.weight")
        width = infos[prefix + marker].shape[0]
        layers = _count(keys, re.escape(stem) + r"(\d+)\.")
        fp8, scaled = _fp8(infos)
        qwen3 = stem + "0.self_attn.q_norm.weight" in infos  # Qwen3's per-head q/k norms; Mistral has none
        kind = "qwen3" if qwen3 else "mistral"
        name = _QWEN3_NAMES.get(width, "Qwen3") if qwen3 else \
            "Mistral-Small-3.1-24B" if width == 5120 else "Mistral-type"
        return Recognised(kind, f"{name} text encoder{_storage('', fp8, scaled)} [{layers} layers of {width}]",
                          layout="hf", prefix=prefix, hidden_size=width, layers=layers, fp8=fp8, scaled=scaled,
                          packed=_packed(infos))
    return None


def recognise_all(infos: dict[str, TensorInfo]) -> list[Recognised]:
    """Every component a header holds: one for a single-component file, several for an all-in-one checkpoint
    (ComfyUI's checkpoints/ files carry the transformer, the VAE and the text encoders under their prefixes)."""
    keys = sorted(infos)
    return [found for probe in (_transformer, _vae, _clip, _t5, _decoder) if (found := probe(keys, infos))]


def recognise_header(infos: dict[str, TensorInfo], kind: str = "") -> Recognised:
    """What a header's tensors are: the component of `kind` when the file holds one, else its first; kind
    'unknown' when none of the markers fits."""
    found = recognise_all(infos)
    if found:
        return next((f for f in found if f.kind == kind), found[0])
    keys = sorted(infos)
    count = f"{len(keys)} tensor{'' if len(keys) == 1 else 's'}"
    return Recognised("unknown", f"not a FLUX component ({count}, e.g. {', '.join(keys[:2])})")


def recognise(path: str | Path, kind: str = "") -> Recognised:
    """What the file at `path` holds (preferring a component of `kind`); raises NotSafetensors when it cannot
    be read as safetensors."""
    return recognise_header(read_header(path), kind)


def recognise_for(slot: str, path: str | Path, flavour: registry.Flavour) -> Recognised:
    """What the file holds, seen from `slot`: its component of the kind the slot needs, if it has one."""
    wanted = expected(slot, flavour)
    return recognise(path, wanted.kind if wanted else "")


# ---------------------------------------------------------------------------------------------- slot checks


@dataclass(frozen=True)
class Expected:
    """What a slot must hold for a flavour: the component kind and its width (0: any)."""

    kind: str
    hidden_size: int
    label: str


def expected(slot: str, flavour: registry.Flavour) -> Expected | None:
    """What `slot` holds for `flavour`; None when the flavour has no such component."""
    if slot == "transformer":
        return Expected("transformer", flavour.hidden_size, f"the {flavour.label} transformer")
    if slot == "vae":
        name = "flux2-vae.safetensors" if flavour.family == "flux2" else "ae.safetensors"
        return Expected("vae", flavour.latent_channels, f"the {flavour.latent_channels}-channel "
                        f"{registry.FAMILIES[flavour.family].label} VAE ({name})")
    index = {"text_encoder": 0, "text_encoder_2": 1}[slot]
    if index >= len(flavour.text_encoders):
        return None
    model_class = flavour.text_encoders[index]
    if model_class == "Qwen3ForCausalLM":
        # FLUX.2 stacks three hidden-state layers of the encoder into the transformer's joint dimension.
        width = flavour.joint_attention_dim // len(flavour.text_encoder_layers)
        return Expected("qwen3", width, f"{_QWEN3_NAMES.get(width, 'a Qwen3')} text encoder (hidden {width})")
    if model_class == "Mistral3ForConditionalGeneration":
        width = flavour.joint_attention_dim // len(flavour.text_encoder_layers)
        return Expected("mistral", width, f"the Mistral-Small-3.1-24B text encoder (hidden {width})")
    if model_class == "CLIPTextModel":
        # FLUX.1 takes CLIP-L's pooled 768-wide output; the demo's tiny CLIP is as wide as its transformer.
        width = flavour.pooled_dim
        return Expected("clip", width, f"CLIP-L (width {width})" if not flavour.is_demo else f"CLIP (width {width})")
    width = flavour.joint_attention_dim
    return Expected("t5", width, f"T5-XXL (d_model {width})" if not flavour.is_demo else f"T5 (d_model {width})")


def _better_slot(found: Recognised, flavour: registry.Flavour) -> str:
    if found.kind in ("transformer", "vae"):
        return f"model.{found.kind}"
    for slot in ("text_encoder", "text_encoder_2"):
        wanted = expected(slot, flavour)
        if wanted is not None and wanted.kind == found.kind:
            return f"model.{slot}"
    return ""


def slot_problem(slot: str, path: str | Path, found: Recognised, flavour: registry.Flavour) -> str | None:
    """One line saying why the file recognised as `found` cannot fill `slot` for `flavour`, else None."""
    field, name = f"model.{slot}", Path(path).name
    wanted = expected(slot, flavour)
    if wanted is None:
        return f"{field}: {flavour.label} has no second text encoder; clear {field}"
    if found.kind == "unknown":
        return f"{field}: '{name}' is {found.label}; expected {wanted.label}"
    if found.kind != wanted.kind:
        other = _better_slot(found, flavour)
        hint = f"; it belongs in {other}" if other and other != field else ""
        return f"{field}: '{name}' is {_KIND_NOUN[found.kind]} ({found.label}), not {wanted.label}{hint}"
    if found.kind == "transformer" and found.architecture is not None:
        return mismatch(field, name, found.architecture, flavour)
    if found.kind == "vae" and found.family != flavour.family:
        return f"{field}: '{name}' is {found.label}; {flavour.label} needs {wanted.label}"
    if wanted.hidden_size and found.hidden_size != wanted.hidden_size:
        return f"{field}: '{name}' is the {found.label}; {flavour.label} needs {wanted.label}"
    if found.packed:
        return (f"{field}: '{name}' is the {found.label} with its weights packed as {found.packed} (a 4-bit format "
                "such as bitsandbytes nf4, or GGUF), which this trainer cannot read; use a bf16, fp16 or fp8 file and "
                "set model.text_encoder_precision to quantise it while it loads")
    return None


def check_file(slot: str, path: str | Path, flavour: registry.Flavour) -> str | None:
    """The preflight line for one slot's file: missing, unreadable or wrong for the slot; None when it fits."""
    field = f"model.{slot}"
    file = Path(path).expanduser()
    if not file.exists():
        return f"{field}: file '{file}' does not exist"
    if not file.is_file():
        return f"{field}: '{file}' is a folder; give a .safetensors file (a diffusers folder goes in model.source)"
    try:
        found = recognise_for(slot, file, flavour)
    except NotSafetensors as exc:
        return f"{field}: '{file}' is not a readable safetensors file ({exc})"
    return slot_problem(slot, file, found, flavour)
