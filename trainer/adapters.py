"""The trained adapter: which transformer modules it wraps, how it starts, and how a run continues a LoRA file.

Two adapter types, both built by peft and injected with diffusers' `add_adapter` under the name "default":
- "lora": `LoraConfig`, ΔW = (alpha / rank) · B A.
- "lokr": `LoKrConfig`, ΔW = (alpha / rank) · kron(w1, w2) with w2 low-rank when rank is small. diffusers 0.42
  `load_lora_weights` reads a peft-format LoKr file that carries its adapter metadata (the tests check it), and
  `load_adapter_weights` below resumes it; ComfyUI and kohya layouts of LoKr are not written by this module.

Targets (`lora.targets`) are a preset name of the model family or a regular expression that must match a
whole module name (`re.fullmatch`), e.g. `transformer_blocks\\.\\d+\\.attn\\.to_(q|k|v)`. Only Linear layers
are ever selected.

Module names, checked against diffusers 0.42 (per block; "double" = `transformer_blocks.N.`, "single" =
`single_transformer_blocks.N.`):

  FLUX.2 (Flux2Transformer2DModel) double: attn.to_q/to_k/to_v/to_out.0 (image stream),
      attn.add_q_proj/add_k_proj/add_v_proj/to_add_out (text stream), ff.linear_in/linear_out,
      ff_context.linear_in/linear_out; single: attn.to_qkv_mlp_proj (fused q, k, v and MLP-in; BFL `linear1`),
      attn.to_out (fused attention-out and MLP-out; BFL `linear2`). AdaLN modulation is shared by all blocks
      and lives outside them (double_stream_modulation_img/txt, single_stream_modulation): never targeted.
  FLUX.1 (FluxTransformer2DModel) double: the same eight attention names, ff.net.0.proj/ff.net.2,
      ff_context.net.0.proj/ff_context.net.2, and the modulation Linears norm1.linear/norm1_context.linear;
      single: attn.to_q/to_k/to_v, proj_mlp (MLP-in), proj_out (fused attention-out and MLP-out), and the
      modulation Linear norm.linear. Outside the blocks: x_embedder, context_embedder, time_text_embed.*,
      norm_out.linear (modulation) and proj_out (the final projection).

Presets (a fused layer that carries an attention projection counts as attention, so attention ∩ mlp = ∅ and
attention ∪ mlp = all in both families; `to_qkv` / `to_added_qkv` are the names after diffusers'
`fuse_qkv_projections()` and are matched where the unfused names are):

  preset       | family | double block                         | single block                 | per block d/s
  -------------+--------+--------------------------------------+------------------------------+--------------
  all          | both   | every Linear but AdaLN modulation    | every Linear but modulation  | 12/2 · 12/5
  attention    | flux2  | 8 attention projections              | to_qkv_mlp_proj, to_out      | 8/2
  attention    | flux1  | 8 attention projections              | to_q, to_k, to_v, proj_out   | 8/4
  mlp          | flux2  | ff and ff_context (4)                | -                            | 4/0
  mlp          | flux1  | ff and ff_context (4)                | proj_mlp                     | 4/1
  tiny         | both   | attn.to_q, attn.to_v, attn.to_out.0  | -                            | 3/0
  mmdit        | flux1  | same as all                          | -                            | 12/0
  context      | flux1  | add_q/k/v_proj, to_add_out (text)    | -                            | 4/0
  context+ffs  | flux1  | context + ff_context (whole text stream) | -                        | 6/0
  all+ffs      | flux1  | all, plus the final `proj_out` outside the blocks (norm_out.linear stays frozen) | 12/5 + 1

  Module counts: demo models (2 double, 2 single blocks): flux2 all 28, attention 20, mlp 8, tiny 6;
  flux1 all 34, attention 24, mlp 10, tiny 6, mmdit 24, context 8, context+ffs 12, all+ffs 35.
  FLUX.2 klein-4B (5/20): all 100, attention 80, mlp 20, tiny 15; klein-9B and dev (8/24, 8/48): all 144 / 192,
  attention 112 / 160, mlp 32, tiny 24. FLUX.1 (19/38): all 418, attention 304, mlp 114, tiny 57, mmdit 228,
  context 76, context+ffs 114, all+ffs 419.
  The FLUX.1 extras carry the names SimpleTuner users know; context, context+ffs and all+ffs hit exactly the
  modules SimpleTuner's `flux_lora_target` of that name hits (its "all+ffs" list also matches the final
  proj_out), so such a LoRA resumes here with `lora.init_from`. SimpleTuner's "all" is attention-only; ours is
  every block Linear (the "attention" preset is the closest to theirs).

Inits (`lora.init`):
  default   peft's: A Kaiming-uniform, B = 0; the output is unchanged at step 0.
  gaussian  peft's: A ~ N(0, 1/rank), B = 0; the output is unchanged at step 0 too.
  pissa     A, B from the top singular vectors of W (peft "pissa_niter_4": fast randomised SVD), and the base
            weight is REWRITTEN to W − (alpha/rank)·B A, so the output is unchanged; needs a bf16/fp16/fp32 base.
  olora     A, B from a QR decomposition of W; REWRITES the base the same way (a bitsandbytes 4/8-bit base is
            re-quantised, so there the output moves slightly). Refused on our quantised bases (fp8, int8, int4,
            nf4 of trainer.memory.quantize), which are read-only, as is pissa.
  LoKr takes only "default" (w1 = 0, so the output is unchanged).

Inits that rewrite the base (pissa, olora) keep the initial A0, B0: `adapter_export` writes the update
relative to the ORIGINAL base, ΔW = s·(B A − B0 A0), as a standard LoRA of rank 2r ([A; A0], [B, −B0]) with
alpha 2·alpha (same scale), so other tools apply it to the model users have.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the spec and the UI read the preset names without it
    import torch

ADAPTER_NAME = "default"
ADAPTER_TYPES = ("lora", "lokr")
INITS = ("default", "gaussian", "pissa", "olora")

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "flux2": ("all", "attention", "mlp", "tiny"),
    "flux1": ("all", "attention", "mlp", "tiny", "mmdit", "context", "all+ffs", "context+ffs"),
}

_FAMILY_NAMES = {"flux2": "FLUX.2", "flux1": "FLUX.1"}

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_NOT_MODULATION = r"(?!(.*\.)?norm)"  # AdaLN modulation Linears: norm1.linear, norm1_context.linear, norm.linear
_IMAGE_ATTENTION = r"attn\.(to_q|to_k|to_v|to_qkv|to_out\.0)"
_TEXT_ATTENTION = r"attn\.(add_q_proj|add_k_proj|add_v_proj|to_added_qkv|to_add_out)"
_TINY = r"attn\.(to_q|to_v|to_out\.0)"
_ALL = (_DOUBLE + _NOT_MODULATION + ".+", _SINGLE + _NOT_MODULATION + ".+")

# family -> preset -> regexes, each matched against whole module names; a module is hit if any matches.
_PRESET_PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "flux2": {
        "all": _ALL,
        "attention": (
            _DOUBLE + _IMAGE_ATTENTION, _DOUBLE + _TEXT_ATTENTION, _SINGLE + r"attn\.(to_qkv_mlp_proj|to_out)",
        ),
        "mlp": (_DOUBLE + r"(ff|ff_context)\.(linear_in|linear_out)",),
        "tiny": (_DOUBLE + _TINY,),
    },
    "flux1": {
        "all": _ALL,
        "attention": (
            _DOUBLE + _IMAGE_ATTENTION, _DOUBLE + _TEXT_ATTENTION,
            _SINGLE + r"(attn\.(to_q|to_k|to_v|to_qkv)|proj_out)",
        ),
        "mlp": (_DOUBLE + r"(ff|ff_context)\.net\.(0\.proj|2)", _SINGLE + "proj_mlp"),
        "tiny": (_DOUBLE + _TINY,),
        "mmdit": (_DOUBLE + _NOT_MODULATION + ".+",),
        "context": (_DOUBLE + _TEXT_ATTENTION,),
        "all+ffs": (*_ALL, "proj_out"),
        "context+ffs": (_DOUBLE + _TEXT_ATTENTION, _DOUBLE + r"ff_context\.net\.(0\.proj|2)"),
    },
}

# peft's names for our inits.
_PEFT_LORA_INIT: dict[str, bool | str] = {
    "default": True, "gaussian": "gaussian", "pissa": "pissa_niter_4", "olora": "olora",
}
_REWRITES_BASE = ("pissa", "olora")
_FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")
_INIT_SEED = 0  # pissa's randomised SVD
_INITIAL_STATE_ATTR = "_adapter_initial_state"  # A0, B0 of an init that rewrote the base, for adapter_export

_ADAPTER_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a"
    r"|lokr_w2_b|lokr_t2|alpha)"
)
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the adapter config


# ---------------------------------------------------------------------------------------------- targets


def _check_family(family: str) -> None:
    if family not in TARGET_PRESETS:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(TARGET_PRESETS)}")


def _linear_names(transformer: torch.nn.Module) -> list[str]:
    """Names of the transformer's Linear layers; a layer already wrapped by peft counts under its own name."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: list[str] = []
    wrapped: set[str] = set()
    for name, module in transformer.named_modules():
        parts = name.split(".")
        if wrapped and any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
            continue  # the base layer and the adapter's own Linears inside a peft layer
        if isinstance(module, BaseTunerLayer):
            wrapped.add(name)
            names.append(name)
        elif isinstance(module, torch.nn.Linear):
            names.append(name)
    return names


def _select(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return [name for name in names if any(p.fullmatch(name) for p in compiled)]


def _example_names(names: list[str]) -> str:
    first_blocks = [n for n in names if re.match(r"(single_)?transformer_blocks\.0\.", n)]
    return ", ".join((first_blocks or names)[:8])


def target_modules(transformer: torch.nn.Module, family: str, targets: str) -> list[str]:
    """Full names of the Linear layers the adapter wraps: a preset of `family` or a regex matching whole names."""
    _check_family(family)
    names = _linear_names(transformer)
    presets = _PRESET_PATTERNS[family]
    label = _FAMILY_NAMES[family]
    if targets in presets:
        chosen = _select(names, presets[targets])
        if not chosen:
            raise UserError(f"lora.targets: the preset '{targets}' hits no Linear layer of this transformer; is it "
                            f"a {label} model? Examples of its module names: {_example_names(names)}")
        return chosen
    for other, other_presets in TARGET_PRESETS.items():
        if targets in other_presets:
            raise UserError(f"lora.targets: '{targets}' is a {_FAMILY_NAMES[other]} preset; {label} presets: "
                            f"{', '.join(TARGET_PRESETS[family])}, or a regex matching whole module names")
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise UserError(f"lora.targets: '{targets}' is neither a preset ({', '.join(TARGET_PRESETS[family])}) "
                        f"nor a valid regular expression ({exc})") from None
    chosen = [name for name in names if pattern.fullmatch(name)]
    if not chosen:
        raise UserError(f"lora.targets: '{targets}' matches no Linear layer of the {label} transformer (a regex must "
                        f"match a whole module name); presets: {', '.join(TARGET_PRESETS[family])}; examples of "
                        f"module names: {_example_names(names)}")
    return chosen


def preset_report(transformer: torch.nn.Module, family: str) -> dict[str, int]:
    """Preset name -> how many modules it hits on this transformer, in the family's preset order."""
    _check_family(family)
    names = _linear_names(transformer)
    return {preset: len(_select(names, _PRESET_PATTERNS[family][preset])) for preset in TARGET_PRESETS[family]}


# ---------------------------------------------------------------------------------------------- adding


def _base_layer(transformer: torch.nn.Module, name: str) -> torch.nn.Module:
    module = transformer.get_submodule(name)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _layer_precision(layer: torch.nn.Module) -> str:
    from trainer.memory.quantize import is_quantized

    # our quantised layers (trainer.memory.quantize) say their format; their `weight` is the packed values
    return str(layer.format) if is_quantized(layer) else _weight_precision(layer.weight)


def _weight_precision(weight: torch.Tensor) -> str:
    """What the base weight is stored as, in base_precision words ("bf16", "nf4", ...)."""
    import torch

    floats = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    kind = type(weight).__name__
    if kind == "Params4bit":
        return str(getattr(weight, "quant_type", "nf4"))
    if kind == "Int8Params":
        return "int8"
    if type(weight.data) is not torch.Tensor:
        return f"quantised ({type(weight.data).__name__})"
    if weight.dtype in floats:
        return floats[weight.dtype]
    if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "fp8"
    return str(weight.dtype).removeprefix("torch.")


def _check_choices(type: str, init: str) -> None:
    """The values the spec allows (LoraSection checks them and how they combine, for the user); this takes
    validated values."""
    if type not in ADAPTER_TYPES or init not in INITS:
        raise ValueError(f"lora.type {type!r} / lora.init {init!r}: not one of {ADAPTER_TYPES} / {INITS}")


def _check_init_fits_base(init: str, precision: str, layers: list[torch.nn.Module]) -> None:
    from trainer.memory.quantize import is_quantized

    stored = sorted({_layer_precision(layer) for layer in layers})
    floats = set(_FLOAT_PRECISIONS)
    ours = [layer for layer in layers if is_quantized(layer)]
    if ours and init in ("pissa", "olora"):
        raise UserError(f"lora.init: '{init}' rewrites the base weights, and with model.base_precision "
                        f"'{ours[0].format}' they are stored quantised and read-only. Use lora.init 'default', or "
                        "model.base_precision bf16, fp16 or fp32.")
    if init == "pissa" and (precision not in floats or not set(stored) <= floats):
        found = precision if precision not in floats else ", ".join(stored)
        raise UserError(f"lora.init: 'pissa' rewrites the base weights (W - BA), so it needs model.base_precision "
                        f"bf16, fp16 or fp32; the base is {found}. Use 'default'.")
    if init == "olora" and not set(stored) <= {"fp32", "bf16", "fp16", "nf4", "fp4", "int8"}:
        raise UserError(f"lora.init: 'olora' rewrites the base weights, which works on bf16, fp16, fp32 and "
                        f"bitsandbytes nf4/int8 bases; the base is {', '.join(stored)}. Use 'default'.")


def _peft_config(type: str, rank: int, alpha: float, dropout: float, init: str, names: list[str]) -> Any:
    # One anchored pattern of the exact names: a list would match by suffix (`proj_out` would also wrap
    # every `single_transformer_blocks.N.proj_out`).
    names = "|".join(re.escape(name) for name in names)  # type: ignore[assignment]
    if type == "lora":
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=_PEFT_LORA_INIT[init],
                          target_modules=names)
    from peft import LoKrConfig

    # LoKr has no input dropout; rank_dropout (dropping rank components of the update) is its counterpart.
    return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, init_weights=True, target_modules=names)


@contextlib.contextmanager
def _seeded(active: bool) -> Iterator[None]:
    """A fixed RNG inside, the caller's RNG state untouched outside; so a resumed run rebuilds the same base."""
    if not active:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(_INIT_SEED)
        yield


def adapter_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's own tensors (LoRA A/B or LoKr factors), whatever their requires_grad."""
    return [p for n, p in transformer.named_parameters() if ".lora_" in n or ".lokr_" in n]


def add_adapter(
    transformer: torch.nn.Module,
    family: str,
    *,
    type: str,
    rank: int,
    alpha: float,
    dropout: float,
    targets: str,
    init: str,
    init_from: str = "",
    base_precision: str | None = None,
) -> list[str]:
    """Add the trainable adapter "default" and return the names of the modules it wraps.

    Freezes the transformer, injects the peft adapter, initialises it as `init` says, keeps the adapter's
    tensors in fp32 whatever the base precision, and with `init_from` continues from that LoRA file (see
    `load_adapter_weights`). `base_precision` is the job's model.base_precision (None: read from the weights).

    pissa and olora REWRITE base weights in place: keep that transformer in memory and never re-read
    its weights from the model file during the run. They are deterministic: adding the adapter again with the
    same arguments to the same base rebuilds the same base and A0, B0, so an exact resume is that followed by
    loading the saved adapter tensors.
    """
    _check_family(family)
    _check_choices(type, init)
    names = target_modules(transformer, family, targets)
    layers = [_base_layer(transformer, name) for name in names]
    precision = base_precision or _layer_precision(layers[0])
    _check_init_fits_base(init, precision, layers)

    transformer.requires_grad_(False)
    with _seeded(init == "pissa"):  # a randomised SVD: the same base gives the same A0, B0 and residual
        transformer.add_adapter(_peft_config(type, rank, alpha, dropout, init, names), adapter_name=ADAPTER_NAME)
    for param in adapter_parameters(transformer):
        param.data = param.data.float()  # fp32 adapter weights whatever the base precision
        param.requires_grad_(True)
    if init in _REWRITES_BASE:
        setattr(transformer, _INITIAL_STATE_ATTR, _adapter_state(transformer))
    if init_from:
        load_adapter_weights(transformer, init_from)
    return names


# ---------------------------------------------------------------------------------------------- files


def _adapter_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    import torch
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    # A copy, never a view of the live parameters (the initial state must not follow training).
    return {key: value.detach().to("cpu", torch.float32, copy=True).contiguous() for key, value in state.items()}


def adapter_export(transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter as a LoRA file holds it: fp32 CPU tensors keyed `<module>.lora_A.weight` … (no prefix) and
    the peft config as JSON-ready metadata, for `Pipeline.save_lora_weights(transformer_lora_layers=…,
    transformer_lora_adapter_metadata=…)`.

    After pissa/olora the update is written relative to the original base (rank 2r, alpha 2·alpha, see the
    module docstring). The metadata always says init "default": loaders build the adapter from it and must not
    run a data-dependent init (PiSSA would rewrite the user's base weights while loading).
    """
    import torch

    state = _adapter_state(transformer)
    config = transformer.peft_config[ADAPTER_NAME].to_dict()
    metadata = {key: (sorted(value) if isinstance(value, set) else value) for key, value in config.items()}
    metadata["peft_type"] = str(getattr(config["peft_type"], "value", config["peft_type"]))
    initial = getattr(transformer, _INITIAL_STATE_ATTR, None)
    if "init_lora_weights" in metadata:
        metadata["init_lora_weights"] = True
        metadata["loftq_config"] = {}
        if initial:
            for key in [k for k in state if k.endswith(".lora_A.weight")]:
                b_key = key.removesuffix(".lora_A.weight") + ".lora_B.weight"
                state[key] = torch.cat([state[key], initial[key]], dim=0).contiguous()
                state[b_key] = torch.cat([state[b_key], -initial[b_key]], dim=1).contiguous()
            metadata["r"] = 2 * metadata["r"]
            metadata["lora_alpha"] = 2 * metadata["lora_alpha"]
    else:
        metadata["init_weights"] = True
    return state, metadata


def _loader_class(transformer: torch.nn.Module) -> Any:
    """The diffusers pipeline whose LoRA loader reads (and converts) this transformer's LoRA files."""
    from diffusers import Flux2KleinPipeline, FluxPipeline

    return Flux2KleinPipeline if type(transformer).__name__.startswith("Flux2") else FluxPipeline


def _read_adapter_file(transformer: torch.nn.Module, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors keyed as peft names them inside the transformer (no prefix), and the adapter metadata if stored.

    diffusers/PEFT files (`transformer.<module>.lora_A.weight`) are read as they are; other layouts (kohya,
    ComfyUI/BFL, ai-toolkit, LyCORIS) go through diffusers' own converter for the family, which folds their
    alphas into the weights.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise UserError(f"lora.init_from: '{file}' is not a readable safetensors file ({exc})") from None
    raw = header.get(_METADATA_KEY)
    metadata: dict[str, Any] = json.loads(raw) if raw else {}
    if not any(key.startswith("transformer.") for key in tensors):
        try:
            converted = _loader_class(transformer).lora_state_dict(str(file), return_lora_metadata=True)
        except Exception as exc:
            raise UserError(f"lora.init_from: '{file.name}' is not a LoRA diffusers can read for this model "
                            f"({type(exc).__name__}: {exc})") from None
        tensors, metadata = converted[0], converted[-1] or {}
    others = sorted({key.split(".", 1)[0] for key in tensors if not key.startswith("transformer.")})
    if others:
        raise UserError(f"lora.init_from: '{file.name}' also holds weights for {', '.join(others)} (e.g. a "
                        "text-encoder LoRA); only transformer LoRAs can be continued here")
    tensors = {key.removeprefix("transformer."): value for key, value in tensors.items()}
    component = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    return tensors, component or metadata


def _group_by_module(state: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    modules: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        match = _ADAPTER_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
        else:
            modules.setdefault(match["module"], {})[match["part"]] = value
    return modules, unknown


def _few(names: list[str] | set[str], count: int = 3) -> str:
    ordered = sorted(names)
    more = f" and {len(ordered) - count} more" if len(ordered) > count else ""
    return ", ".join(ordered[:count]) + more


def _file_kind(parts: dict[str, dict[str, Any]]) -> str:
    keys = {part for module in parts.values() for part in module}
    return "lokr" if any(k.startswith("lokr_") for k in keys) else "lora"


def _mismatches(transformer: torch.nn.Module, expected: dict[str, dict[str, Any]],
                found: dict[str, dict[str, Any]], unknown: list[str], rank: int) -> list[str]:
    """Every way the file differs from the adapter, in words that say what to change."""
    kind = "lokr" if any(k.startswith("lokr_") for m in expected.values() for k in m) else "lora"
    file_kind = _file_kind(found)
    if file_kind != kind:
        return [f"it holds a {'LoKr' if file_kind == 'lokr' else 'LoRA'} adapter and lora.type is '{kind}'"]
    problems: list[str] = []
    if unknown:
        problems.append(f"it has keys this trainer does not train ({_few(unknown)}; DoRA or bias weights?)")
    all_modules = {name for name, _ in transformer.named_modules()}
    foreign = {m for m in found if m not in expected and m not in all_modules}
    outside = {m for m in found if m not in expected and m in all_modules}
    missing = {m for m in expected if m not in found}
    if foreign:
        problems.append(f"{len(foreign)} of its modules are not in this transformer ({_few(foreign)}): a LoRA for "
                        "another model family?")
    if outside:
        problems.append(f"it also trains {len(outside)} modules outside lora.targets ({_few(outside)})")
    if missing:
        problems.append(f"it lacks {len(missing)} of the {len(expected)} modules lora.targets selects "
                        f"({_few(missing)}); set lora.targets to what it was trained on")
    file_ranks: set[int] = set()
    shapes: list[str] = []
    for module in sorted(set(expected) & set(found)):
        ours = {part: tuple(t.shape) for part, t in expected[module].items()}
        theirs = {part: tuple(t.shape) for part, t in found[module].items() if part != "alpha"}
        if "lora_A.weight" in theirs and theirs["lora_A.weight"][0] != rank:
            file_ranks.add(theirs["lora_A.weight"][0])
        elif ours != theirs:
            shapes.append(f"{module}: {theirs} in the file, {ours} here")
    if file_ranks:
        problems.append(f"it has rank {'/'.join(map(str, sorted(file_ranks)))} and lora.rank is {rank}")
    elif shapes:
        problems.append(f"{len(shapes)} modules differ in shape ({'; '.join(shapes[:2])}): another model size, "
                        "or a LoKr of another lora.rank?")
    return problems


def _file_scale(module: str, parts: dict[str, Any], metadata: dict[str, Any], kind: str) -> float:
    """alpha / rank the file's weights were trained with; 1 where nothing says (diffusers assumes alpha = rank)."""
    from peft.utils.other import get_pattern_key

    rank = metadata.get("r")
    alpha = metadata.get("lora_alpha" if kind == "lora" else "alpha")
    if metadata.get("rank_pattern"):
        rank = metadata["rank_pattern"].get(get_pattern_key(metadata["rank_pattern"].keys(), module), rank)
    if metadata.get("alpha_pattern"):
        alpha = metadata["alpha_pattern"].get(get_pattern_key(metadata["alpha_pattern"].keys(), module), alpha)
    if "alpha" in parts:
        alpha = float(parts["alpha"])
        rank = parts["lora_A.weight"].shape[0] if "lora_A.weight" in parts else rank
    if alpha is None or not rank:
        return 1.0
    return float(alpha) / float(rank)


def load_adapter_weights(transformer: torch.nn.Module, path: str) -> None:
    """Continue from a LoRA (or LoKr) file: load its weights into the adapter "default", strictly.

    The file must cover exactly the adapter's modules with the same shapes (type, rank, family and model size);
    anything else raises a UserError naming lora.init_from and what differs. The file's update is kept as it
    was trained: if its alpha/rank scale differs from the adapter's (another lora.alpha), B (LoKr: w1) is scaled
    to match, so the loaded model computes what the file's model computed.
    """
    import torch
    from peft.utils import set_peft_model_state_dict

    file = Path(path)
    if not file.is_file():
        raise UserError(f"lora.init_from: '{path}' is not a file")
    if file.suffix != ".safetensors":
        raise UserError(f"lora.init_from: '{file.name}' is not a .safetensors LoRA file")
    if ADAPTER_NAME not in getattr(transformer, "peft_config", {}):
        raise RuntimeError("load_adapter_weights needs the adapter added first (add_adapter)")
    config = transformer.peft_config[ADAPTER_NAME]
    kind = "lokr" if "LOKR" in str(config.peft_type) else "lora"
    tensors, metadata = _read_adapter_file(transformer, file)
    found, unknown = _group_by_module(tensors)
    expected, _ = _group_by_module(_adapter_state(transformer))
    problems = _mismatches(transformer, expected, found, unknown, config.r)
    if problems:
        raise UserError(f"lora.init_from: '{file.name}' does not fit this adapter: " + "; ".join(problems))

    state: dict[str, torch.Tensor] = {}
    for module, parts in found.items():
        layer = transformer.get_submodule(module)
        ratio = _file_scale(module, parts, metadata, kind) / float(layer.scaling[ADAPTER_NAME])
        scaled = "lora_B.weight" if kind == "lora" else ("lokr_w1" if "lokr_w1" in parts else "lokr_w1_a")
        for part, tensor in parts.items():
            if part != "alpha":
                state[f"{module}.{part}"] = tensor * ratio if part == scaled and ratio != 1.0 else tensor
    with torch.no_grad():
        result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    leftover = [key for key in result.unexpected_keys if ".lora_" in key or ".lokr_" in key]
    if leftover:
        raise RuntimeError(f"adapter keys were not loaded: {_few(leftover)}")


def flavour_preset_counts(family: str, flavour: str) -> dict[str, int]:
    """Preset name -> modules hit on a flavour's transformer, built on the meta device from the registry's facts.

    Module names depend only on the block counts, so no weights are needed; the UI and `validate` show this.
    """
    import diffusers
    import torch

    from trainer import registry

    info = registry.get_flavour(family, flavour)
    model_class = getattr(diffusers, info.transformer_class)
    kwargs = {"num_layers": info.double_blocks, "num_single_layers": info.single_blocks,
              "num_attention_heads": info.num_heads, "attention_head_dim": info.head_dim,
              "joint_attention_dim": info.joint_attention_dim, "guidance_embeds": info.guidance == "embedded"}
    if family == "flux1":
        kwargs["pooled_projection_dim"] = info.pooled_dim
    with torch.device("meta"):
        transformer = model_class(**kwargs)
    return preset_report(transformer, family)
