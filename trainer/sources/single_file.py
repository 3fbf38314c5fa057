"""Components built from single files: the model is made on the meta device from its config (which comes from
model.source), then filled tensor by tensor from the file, so peak RAM is the loaded model plus one tensor,
never the file and a converted copy of it.

Transformer: each diffusers weight is read from its BFL pieces (`transformer_keys.py`) a slice of rows at a
time. With a quantised base_precision the block Linears are quantised as they stream, like
`trainer.memory.quantize.load_quantized_transformer` does for a diffusers folder; an fp8 e4m3 file loaded with
base_precision fp8 keeps its stored values and scales as they are (no second rounding). Otherwise fp8 weights
are dequantised to the compute dtype.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.memory.heap import HeapTrimmer, release_freed_heap
from trainer.sources.reader import FileReader
from trainer.sources.recognise import Recognised
from trainer.sources.transformer_keys import identity_plan, transformer_plan
from trainer.sources.vae_keys import vae_ldm_to_diffusers


def _few(names: list[str] | set[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _still_empty(model: torch.nn.Module) -> list[str]:
    return [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]


def load_transformer_file(path: str | Path, found: Recognised, config_folder: str | Path, model_class: type,
                          precision: str, dtype: torch.dtype, work_device: torch.device | str | None = None,
                          modulation: str | None = None,
                          sink: Any = None) -> torch.nn.Module:  # noqa: ANN401 - a block_store.BlockSink
    """The transformer of a single file (BFL or diffusers layout), configured by `config_folder`/config.json,
    frozen and in eval mode on the CPU; `precision` fp8/int8/int4/nf4 stores the block Linears quantised (FLUX.1's
    modulation in `modulation`, None: the compute dtype). A `sink` takes each swapped block once it is complete
    (trainer.memory.block_store.BlockSink), or skips reading it when the block cache holds it."""
    from accelerate import init_empty_weights

    from trainer.memory.quantize import QuantizedLinear, block_groups, linear_formats

    reader = FileReader(path, found.prefix, "model.transformer")
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(str(config_folder)))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    plan = transformer_plan(found.family, shapes) if found.layout == "bfl" else identity_plan(shapes)
    _check_against(reader, plan, shapes, Path(config_folder))
    quantised: dict[str, str] = {}
    for name, stored in linear_formats(model, precision, modulation).items():
        linear = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantizedLinear(
            linear.in_features, linear.out_features, linear.bias is not None, stored, dtype, device="meta"))
        quantised[f"{name}.weight"] = stored
    if work_device is None:
        work_device = "cuda" if torch.cuda.is_available() else "cpu"
    for prefix, names in block_groups(list(plan)):
        if sink is None or sink.wants(prefix):
            for name in names:
                _fill(model, reader, name, plan[name], shapes[name], quantised.get(name), dtype, work_device)
        if sink is not None and prefix is not None:
            sink.complete(prefix, model.get_submodule(prefix))
        release_freed_heap()  # once per block: the freed slices would stay resident (trainer/memory/heap.py)
    empty = _still_empty(model)
    if empty:
        raise UserError(f"model.transformer: '{reader.path.name}' left {len(empty)} tensors unset ({_few(empty)})")
    model.register_to_config(_name_or_path=str(path))
    return model.eval()


def _fill(model: torch.nn.Module, reader: FileReader, name: str, pieces: tuple, shape: tuple[int, ...],
          stored: str | None, dtype: torch.dtype, work_device: torch.device | str) -> None:
    """One diffusers tensor from its file pieces: quantised as it streams when `stored` names a format, else in
    the compute `dtype`."""
    rows = shape[0] if shape else 1
    if stored is None:
        tensor = reader.gather(pieces, 0, rows, dtype) if shape else reader.tensor(pieces[0].key, dtype)
        _set_tensor(model, name, tensor.reshape(shape))
        return
    layer = model.get_submodule(name.rpartition(".")[0])
    first = pieces[0]
    if stored == "fp8" and len(pieces) == 1 and reader.is_e4m3(first.key):
        # The file's e4m3 values with one scale per tensor (or row) are our fp8 format already: kept exactly.
        scale = reader.scale(first.key, first.start, first.stop)
        layer.qweight = reader.stored_rows(first.key, first.start, first.stop)
        layer.scale = (torch.ones(rows) if scale is None else scale.reshape(-1).expand(rows)).float().contiguous()
        return
    layer.load_weight(lambda start, stop, p=pieces: reader.gather(p, start, stop, torch.float32),
                      work_device=work_device)


def _check_against(reader: FileReader, plan: dict, shapes: dict[str, tuple[int, ...]], config_folder: Path) -> None:
    """Refuses a file whose tensors do not fit the model its config describes, naming what differs."""
    from trainer.sources.transformer_keys import bfl_shapes

    wanted = bfl_shapes(plan, shapes)
    have = set(reader.names())
    missing, extra = sorted(set(wanted) - have), sorted(have - set(wanted))
    wrong = [f"'{k}' is {reader.shape(k)}, expected {wanted[k]}" for k in sorted(set(wanted) & have)
             if reader.shape(k) != wanted[k] and reader.shape(k) != () and wanted[k] != (1,)]
    problems = ([f"it lacks {len(missing)} tensors ({_few(missing)})"] if missing else []) + (
        [f"it has {len(extra)} tensors this model has not ({_few(extra)})"] if extra else []) + wrong[:3]
    if problems:
        raise UserError(f"model.transformer: '{reader.path.name}' does not fit the transformer configured by "
                        f"'{config_folder / 'config.json'}': {'; '.join(problems)}")


def load_vae_file(path: str | Path, found: Recognised, config_folder: str | Path, model_class: type,
                  dtype: torch.dtype) -> torch.nn.Module:
    """The VAE of a single file (BFL/ldm or diffusers layout), configured by `config_folder`/config.json."""
    from accelerate import init_empty_weights

    reader = FileReader(path, found.prefix, "model.vae")
    state = {name: reader.tensor(name, dtype) for name in reader.names()}  # a VAE is small: read at once
    config = model_class.load_config(str(config_folder))
    if found.layout == "bfl":
        state = vae_ldm_to_diffusers(state, dict(config))
    with init_empty_weights():
        model = model_class.from_config(config)
    expected = model.state_dict()
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    wrong = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        parts = ([f"it lacks {len(missing)} tensors ({_few(missing)})"] if missing else []) + (
            [f"it has {len(extra)} tensors this VAE has not ({_few(extra)})"] if extra else []) + (
            [f"{len(wrong)} tensors have other shapes ({_few(wrong)})"] if wrong else [])
        raise UserError(f"model.vae: '{Path(path).name}' does not fit the VAE configured by "
                        f"'{Path(config_folder) / 'config.json'}': {'; '.join(parts)}")
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False)
    model.register_to_config(_name_or_path=str(path))
    return model.eval()


# ---------------------------------------------------------------------------------------------- text encoders


# Tensors of the full CLIP that CLIPTextModel lacks (FLUX.1 takes the pooled output before the projection).
_CLIP_EXTRAS = ("text_projection.weight", "logit_scale", "embeddings.position_ids")
_DECODER_STEMS = ("model.language_model.", "language_model.model.", "model.")
_DECODERS = ("qwen3", "mistral")  # language models whose hidden states are the prompt embedding


class NoLogits(torch.nn.Module):
    """A decoder's language-model head, left out: the pipelines read hidden states and never the logits, so the
    head's weights (Qwen3-8B's untied 0.62 B, Mistral's 0.67 B) are never loaded and no logits are computed (512
    tokens of a 152k vocabulary: 0.6 TFLOP and a 1.2 GiB dequantised head per prompt batch)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., :0]


def _unused(kind: str, name: str) -> bool:
    """A file's tensor that no prompt ever reads: the full CLIP's extras, a decoder's language-model head."""
    return (kind == "clip" and name.endswith(_CLIP_EXTRAS)) or (kind in _DECODERS and name.endswith("lm_head.weight"))


def _text_key(kind: str, name: str, expected: dict[str, Any]) -> str | None:
    """The model's state-dict name of a file's text encoder tensor, trying the spellings in use (ComfyUI keeps
    Mistral's language model alone as `model.layers...`; transformers 5 nests it as `model.language_model.` and
    drops CLIPTextModel's `text_model.`, transformers 4 kept it); None when the model has no such tensor."""
    candidates = [name]
    if kind == "clip":
        candidates += [f"text_model.{name}", name.removeprefix("text_model.")]
    if kind == "mistral":
        rest = next((name[len(stem):] for stem in _DECODER_STEMS if name.startswith(stem)), None)
        if rest is not None:  # the image tower's tensors never get here (`_dropped`)
            candidates += [stem + rest for stem in _DECODER_STEMS]
    return next((c for c in candidates if c in expected), None)


def _layer_stem(expected: dict[str, Any]) -> str:
    """The state-dict stem of a decoder's layers, e.g. `model.layers.` (not an image tower's)."""
    return next(m.group(1) for key in expected
                if (m := re.match(r"(.*layers\.)0\.post_attention_layernorm\.weight$", key)))


def load_text_encoder_file(path: str | Path, found: Recognised, config_folder: str | Path, class_name: str,
                           dtype: torch.dtype, hidden_layers: tuple[int, ...] = (),
                           precision: str = "") -> torch.nn.Module:
    """A text encoder from a single file (ComfyUI's qwen_3_*, Mistral, clip_l, t5xxl; fp8 ones dequantised, or kept
    as they are with `precision` fp8), configured by `config_folder`/config.json. A decoder file cut short (ComfyUI's
    pruned Mistral for FLUX.2) loads when it keeps every layer up to the deepest hidden state in `hidden_layers`.
    `precision` fp8/int8/int4/nf4: every Linear is quantised while it streams in (see `fill_text_encoder`)."""
    field = "model.text_encoder_2" if found.kind == "t5" and class_name == "T5EncoderModel" else "model.text_encoder"
    return fill_text_encoder([FileReader(path, found.prefix, field)], found, config_folder, class_name, dtype,
                             hidden_layers, precision)


def fill_text_encoder(readers: list[FileReader], found: Recognised, config_folder: str | Path, class_name: str,
                      dtype: torch.dtype, hidden_layers: tuple[int, ...] = (), precision: str = "") -> torch.nn.Module:
    """The text encoder whose tensors `readers` hold (one single file, or the shards of a diffusers folder's
    text_encoder/), built on the meta device and filled tensor by tensor. With a quantised `precision` its Linears
    (layers, a vision tower) are quantised a slice of rows at a time, so the peak is the final
    size plus one slice; the token table and norms stay in `dtype`."""
    import transformers
    from accelerate import init_empty_weights

    field, name0 = readers[0].field, readers[0].path.name
    model_class = getattr(transformers, class_name)
    config = transformers.AutoConfig.from_pretrained(str(config_folder))
    with init_empty_weights():
        model = model_class(config)
    if found.kind in _DECODERS:
        model.lm_head = NoLogits()
    expected, keep = _prune_layers(model, found, field, name0, hidden_layers)
    sources = {name: reader for reader in readers for name in reader.names() if not _dropped(found.kind, name, keep)}
    names = {name: _text_key(found.kind, name, expected) for name in sources}
    extra = sorted(name for name, key in names.items() if key is None and not _unused(found.kind, name))
    names = {name: key for name, key in names.items() if key is not None}
    if extra:
        raise UserError(f"{field}: '{name0}' has {len(extra)} tensors {class_name} from "
                        f"'{Path(config_folder) / 'config.json'}' has not ({_few(extra)})")
    quantised = _quantise_text_linears(model, set(names.values()), precision, dtype)
    trimmer = HeapTrimmer()  # freed slices of a streamed quantisation would stay resident (trainer/memory/heap.py)
    for name, key in names.items():
        reader = sources[name]
        if tuple(expected[key].shape) != reader.shape(name):
            raise UserError(f"{field}: '{reader.path.name}': '{name}' is {reader.shape(name)}, the config at "
                            f"'{Path(config_folder) / 'config.json'}' wants {tuple(expected[key].shape)}")
        if key in quantised:
            layer = model.get_submodule(key.rpartition(".")[0])
            _stream_quantised(layer, reader, name, precision)
            trimmer.add(layer.qweight.nbytes)
        else:
            _set_tensor(model, key, reader.tensor(name, dtype))
    trimmer.flush()
    _tie_t5_embedding(model)
    empty = _still_empty(model)
    if empty:
        raise UserError(f"{field}: '{name0}' lacks {len(empty)} tensors {class_name} needs ({_few(empty)})")
    model.requires_grad_(False)
    return model.eval()


def _prune_layers(model: torch.nn.Module, found: Recognised, field: str, name: str,
                  hidden_layers: tuple[int, ...]) -> tuple[dict[str, Any], int]:
    """(the model's state dict, the decoder layers kept) once the layers past the deepest hidden state the
    pipeline reads are dropped: never computed or loaded, whether the file has them (the hub's Qwen3 and Mistral:
    8 of 36 and 9 of 40 layers) or was cut short (ComfyUI's Mistral for FLUX.2). A Mistral's image tower goes too:
    prompts never read it (only prompt upsampling, which this trainer never calls)."""
    if found.kind == "mistral" and getattr(getattr(model, "model", None), "vision_tower", None) is not None:
        model.model.vision_tower = None
        model.model.multi_modal_projector = None
    expected = model.state_dict()
    if found.kind not in _DECODERS:
        return expected, 0
    stem = _layer_stem(expected)
    layers = model.get_submodule(stem.rstrip("."))
    # one past the deepest hidden state read, which must not be the last one (transformers norms that)
    deepest = max(hidden_layers, default=len(layers))
    keep = min(deepest + 1, len(layers))
    if found.layers and found.layers < keep:
        raise UserError(f"{field}: '{name}' has {found.layers} layers; this model reads hidden state {deepest}, "
                        f"so it needs at least {keep}")
    if keep == len(layers):
        return expected, keep
    del layers[keep:]
    text_config = getattr(model.config, "text_config", model.config)
    text_config.num_hidden_layers = keep
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = text_config.layer_types[:keep]
    return {k: v for k, v in model.state_dict().items()
            if not (k.startswith(stem) and int(k[len(stem):].split(".")[0]) >= keep)}, keep


def _dropped(kind: str, name: str, keep: int) -> bool:
    """A file's tensor of what `_prune_layers` dropped: a decoder layer past the kept ones, a Mistral image tower."""
    if kind not in _DECODERS:
        return False
    if kind == "mistral" and re.search(r"(^|\.)(vision_tower|multi_modal_projector)\.", name):
        return True
    found = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return found is not None and int(found[1]) >= keep


def _quantise_text_linears(model: torch.nn.Module, keys: set[str], precision: str, dtype: torch.dtype) -> set[str]:
    """Replace every Linear whose weight the file holds with a quantised one (meta, filled as it streams); a
    tied head the file lacks stays a plain Linear sharing the token table. Returns the quantised weights' keys."""
    from trainer.memory.quantize import FORMATS, QuantizedTextLinear

    if precision not in FORMATS:
        return set()
    chosen = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in keys:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, QuantizedTextLinear(
                module.in_features, module.out_features, module.bias is not None, precision, dtype, device="meta"))
            chosen.add(f"{name}.weight")
    return chosen


def _stream_quantised(layer: torch.nn.Module, reader: FileReader, name: str, precision: str) -> None:
    """One Linear's weight, quantised a slice of rows at a time; an fp8 e4m3 weight loaded as fp8 keeps its
    stored values and scale (no second rounding)."""
    rows = reader.shape(name)[0]
    if precision == "fp8" and reader.is_e4m3(name):
        scale = reader.scale(name, 0, rows)
        layer.qweight = reader.stored_rows(name, 0, rows)
        layer.scale = (torch.ones(rows) if scale is None else scale.reshape(-1).expand(rows)).float().contiguous()
        return
    work = "cuda" if torch.cuda.is_available() else "cpu"
    layer.load_weight(lambda start, stop: reader.rows(name, start, stop, torch.float32), work_device=work)


def _tie_t5_embedding(model: torch.nn.Module) -> None:
    """T5's encoder embedding, tied or absent in the file, shares the input embedding, as transformers ties it."""
    embedding = model.get_input_embeddings().weight
    tokens = getattr(getattr(model, "encoder", None), "embed_tokens", None)
    if tokens is not None and tokens.weight.is_meta and not embedding.is_meta:
        tokens.weight = embedding

