"""Weight-only quantised Linear layers for the frozen transformer, and a loader that quantises while it streams.

Formats, for one weight W of shape (out, in); bytes per weight include the scales (the bias stays in the
compute dtype):

  format | values                                              | scales (fp32)                        | bytes
  -------+-----------------------------------------------------+--------------------------------------+-------------
  fp8    | float8_e4m3fn, W / scale                            | one per output row: absmax / 448     | 1 + 4/in
  int8   | int8 in [-127, 127], round(W / scale)               | one per output row: absmax / 127     | 1 + 4/in
  int4   | round(W / scale) in [-7, 7], stored + 8, two per    | one per group of 64 along the input  | 0.5 + 4/64
         | uint8 (the even column in the low nibble)           | dimension: absmax / 7                |
  nf4    | index of the nearest NF4 level, two per uint8 (the  | absmax of each block of 64 over the  | 0.5 + 4/64
         | first in the high nibble, as bitsandbytes packs)    | row-major flattened W                |

Rows whose length is not a multiple of 64 are zero-padded to one (int4 per row, nf4 at the end of the flat W).
Every piece of state is a plain tensor: the values and their scales are buffers, the bias a frozen Parameter.
Block swap moves a block's tensors between devices as flat bytes, which tensor subclasses (quanto, torchao,
bitsandbytes) would not survive. Forward dequantises to the input's dtype and calls F.linear; the gradient
to the input dequantises again in backward, so no full-precision copy of a weight is kept for backward.

Why this Linear and not optimum-quanto's or bitsandbytes' (both are dependencies: bitsandbytes gives the 8-bit
optimisers and the NF4 reference LoftQ checks against): the base transformer and the text encoders are quantised
while they stream from the file a slice of rows at a time, on the CPU when there is no GPU. quanto's
`quantize`/`freeze` and bitsandbytes' `Linear4bit`/`Linear8bitLt` quantise a whole float weight that is already
in memory (bitsandbytes when the layer moves to the GPU), so the load would peak at the bf16 model; and their
weights are tensor subclasses (QTensor, Params4bit) that block swap, the streamed ("offload") text encoder and
the block cache cannot pack as flat bytes. Here every format is plain buffers, NF4 uses bitsandbytes' levels and
block size (so the stored values are its NF4 of the weight), and an fp8 file is kept as it is stored.

`load_quantized_transformer` builds the model on the meta device and reads the safetensors files a slice of
rows at a time, quantising each block Linear as it arrives; each read reopens the file, so the mapped pages
of what was read are released at once and peak RAM stays near the final size plus one slice.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer import safetensors_rows
from trainer.errors import UserError
from trainer.memory.heap import release_freed_heap

FORMATS = ("fp8", "int8", "int4", "nf4")
GROUP_SIZE = 64  # int4 groups and nf4 blocks; bitsandbytes' default NF4 block size, so our NF4(W) is theirs
# Storage per weight for large layers (scales included), for the estimator; `storage_bytes` is exact.
BYTES_PER_WEIGHT = {"fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / GROUP_SIZE, "nf4": 0.5 + 4 / GROUP_SIZE}

_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_CHUNK_ELEMENTS = 1 << 22  # weights quantised at a time: a 16 MiB fp32 working copy, whatever the layer's size

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, Dettmers et al. 2023),
# the same values bitsandbytes uses.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_NF4_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False))
_tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

# Attention and MLP Linears inside the blocks. FLUX.1's AdaLN modulation (`norm1.linear`, `norm1_context.linear`,
# `norm.linear`) is quantised only in the format trainer.spec.modulation_format gives (8-bit, as ComfyUI's fp8
# checkpoints store it); embedders, norm_out and proj_out outside the blocks always stay in the compute dtype.
_QUANTISED_LINEAR = re.compile(r"(single_)?transformer_blocks\.\d+\.(?!(.*\.)?norm).+")
_MODULATION_LINEAR = re.compile(r"(single_)?transformer_blocks\.\d+\.(.*\.)?norm[^.]*\.linear")
_BLOCK_PREFIX = re.compile(r"^((single_)?transformer_blocks\.\d+)\.")
PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantised format {fmt!r}; known: {', '.join(FORMATS)}")


def _padded(count: int) -> int:
    return -(-count // GROUP_SIZE) * GROUP_SIZE


def _layout(out_features: int, in_features: int, fmt: str) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
    """Shapes of the values and the scales, and the values' dtype."""
    _check_format(fmt)
    if fmt in ("fp8", "int8"):
        return (out_features, in_features), (out_features,), torch.float8_e4m3fn if fmt == "fp8" else torch.int8
    if fmt == "int4":
        width = _padded(in_features)
        return (out_features, width // 2), (out_features, width // GROUP_SIZE), torch.uint8
    flat = _padded(out_features * in_features)
    return (flat // 2,), (flat // GROUP_SIZE,), torch.uint8


def storage_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Bytes of a quantised (out, in) weight, values and fp32 scales (the bias is extra)."""
    values, scales, dtype = _layout(out_features, in_features, fmt)
    return math.prod(values) * torch.empty((), dtype=dtype).element_size() + 4 * math.prod(scales)


def _table(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Small lookup tables, one host-to-device copy per device rather than one per forward.

    "midpoints": the 15 NF4 decision boundaries; "nf4" / "int4": for each of the 256 byte values, the two
    weights it packs, in flat order (so one embedding lookup unpacks and decodes at once)."""
    key = (kind, device, dtype)
    if key not in _tables:
        if kind == "midpoints":
            table = torch.tensor(_NF4_MIDPOINTS, dtype=dtype)
        else:
            byte = torch.arange(256)
            if kind == "nf4":
                levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
                table = torch.stack((levels[byte >> 4], levels[byte & 15]), dim=1).to(dtype)
            else:
                table = torch.stack(((byte & 15) - 8, (byte >> 4) - 8), dim=1).to(dtype)
        _tables[key] = table.to(device)
    return _tables[key]


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row, group or block is exact with any scale; 1 avoids a division by zero.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _quantize_chunk(rows: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows (r, in) to their values and scales, laid out as `_layout` says."""
    if fmt in ("fp8", "int8"):
        top = _FP8_MAX if fmt == "fp8" else 127.0
        scale = _nonzero(rows.abs().amax(dim=1) / top)
        scaled = (rows / scale[:, None]).clamp_(-top, top)
        values = scaled.to(torch.float8_e4m3fn) if fmt == "fp8" else scaled.round_().to(torch.int8)
        return values, scale
    if fmt == "int4":
        padded = F.pad(rows, (0, _padded(rows.shape[1]) - rows.shape[1]))
        groups = padded.view(rows.shape[0], -1, GROUP_SIZE)
        scale = _nonzero(groups.abs().amax(dim=2) / 7.0)
        codes = (groups / scale[..., None]).round_().clamp_(-7, 7).add_(8).to(torch.uint8).view(rows.shape[0], -1)
        return codes[:, 0::2] | (codes[:, 1::2] << 4), scale
    flat = rows.reshape(-1)
    blocks = F.pad(flat, (0, _padded(flat.numel()) - flat.numel())).view(-1, GROUP_SIZE)
    absmax = _nonzero(blocks.abs().amax(dim=1))
    codes = torch.bucketize(blocks / absmax[:, None], _table("midpoints", rows.device, torch.float32), out_int32=True)
    codes = codes.to(torch.uint8).view(-1)
    return (codes[0::2] << 4) | codes[1::2], absmax


def quantize_rows(read_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], fmt: str,
                  work_device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and scales (on the CPU) of an (out, in) weight read in slices of rows: `read_rows(start, stop)`
    gives rows start..stop-1 in any float dtype, so a caller streaming from a file never holds the whole weight.
    The arithmetic runs on `work_device` (a GPU quantises a large model in seconds, a CPU in minutes)."""
    out_features, in_features = shape
    values_shape, scales_shape, dtype = _layout(out_features, in_features, fmt)
    values = torch.empty(values_shape, dtype=dtype)
    scales = torch.empty(scales_shape, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // in_features)
    if fmt == "nf4":  # whole blocks per slice, so the flat block grid is the same as for the whole weight
        align = GROUP_SIZE // math.gcd(in_features, GROUP_SIZE)
        step = max(align, step // align * align)
    for start in range(0, out_features, step):
        stop = min(out_features, start + step)
        rows = read_rows(start, stop).to(work_device, torch.float32)
        if rows.shape != (stop - start, in_features):
            raise ValueError(f"rows {start}:{stop} have shape {tuple(rows.shape)}, expected {in_features} columns")
        chunk_values, chunk_scales = (t.cpu() for t in _quantize_chunk(rows, fmt))
        if fmt == "nf4":
            first = start * in_features
            values[first // 2: first // 2 + chunk_values.numel()] = chunk_values
            scales[first // GROUP_SIZE: first // GROUP_SIZE + chunk_scales.numel()] = chunk_scales
        else:
            values[start:stop] = chunk_values
            scales[start:stop] = chunk_scales
    return values, scales


def dequantize(values: torch.Tensor, scales: torch.Tensor, fmt: str, shape: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype`.

    bf16 multiplies in bf16 (scale, NF4 level and product each rounded once, within 3 * 2^-8 of the fp32 result):
    an fp32 intermediate would double the transient memory of every layer's forward and backward."""
    out_features, in_features = shape
    # fp16 cannot hold small scales (absmax / 448 of a 1e-2 row is subnormal), so it multiplies in fp32.
    work = torch.float32 if dtype == torch.float16 else dtype
    if fmt in ("fp8", "int8"):
        weight = values.to(work).mul_(scales.to(work)[:, None])
    else:
        # one lookup per byte gives its two weights in flat order: (out, in / 2, 2) for int4, (n / 2, 2) for nf4
        pairs = F.embedding(values.int(), _table(fmt, values.device, work))
        if fmt == "int4":
            weight = pairs.view(out_features, -1, GROUP_SIZE).mul_(scales.to(work)[..., None])
            weight = weight.view(out_features, -1)[:, :in_features]
        else:
            weight = pairs.view(-1, GROUP_SIZE).mul_(scales.to(work)[:, None])
            weight = weight.view(-1)[: out_features * in_features].view(out_features, in_features)
    return weight.to(dtype)


class _DequantizedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W frozen: backward dequantises W again instead of keeping it alive from forward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_x = (grad @ ctx.layer.dequantize(grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


class QuantizedLinear(torch.nn.Linear):
    """A frozen Linear whose weight is stored quantised (`qweight`, `scale` buffers).

    It is an `nn.Linear`, so peft wraps it with its ordinary LoRA layer. Its `weight` is the stored values
    (`qweight`), as bitsandbytes' and GPTQ's layers expose theirs; `dequantize(dtype)` gives the float weight.
    peft reads the device there and the LoRA dtype from `compute_dtype` (adapters.add_adapter then makes A and
    B fp32); a dequantising `weight` would be computed some twenty times per layer while peft adds the adapter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        torch.nn.Module.__init__(self)  # nn.Linear's own __init__ would register a float `weight` Parameter
        self.in_features, self.out_features = in_features, out_features
        self.format = fmt
        self.compute_dtype = compute_dtype
        values_shape, scales_shape, dtype = _layout(out_features, in_features, fmt)
        self.register_buffer("qweight", torch.empty(values_shape, dtype=dtype, device=device))
        self.register_buffer("scale", torch.empty(scales_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                           requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, fmt: str, compute_dtype: torch.dtype) -> QuantizedLinear:
        """The quantised copy of a loaded Linear, on the Linear's device."""
        device = linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, compute_dtype)
        weight = linear.weight.detach()
        layer.load_weight(lambda start, stop: weight[start:stop], work_device=device)
        layer.to(device)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return layer

    def load_weight(self, read_rows: Callable[[int, int], torch.Tensor],
                    work_device: torch.device | str | None = None) -> None:
        """Quantise the full-precision weight that `read_rows(start, stop)` gives a slice at a time; the
        quantised tensors land on the CPU."""
        shape = (self.out_features, self.in_features)
        self.qweight, self.scale = quantize_rows(read_rows, shape, self.format, work_device)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.format, (self.out_features, self.in_features), dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _DequantizedLinear.apply(x, bias, self)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        # Module.to(dtype), .half() and the like cast every floating tensor; the fp8 values and fp32 scales
        # must keep their dtypes, so from such a cast they only take the move to another device.
        stored = {name: self._buffers.pop(name) for name in ("qweight", "scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in stored.items():
                moved = fn(tensor)
                self._buffers[name] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.format}"


class QuantizedTextLinear(QuantizedLinear):
    """A text encoder's quantised Linear. transformers' T5 casts its input to `wo.weight.dtype` before the last
    projection; here `weight` is a zero-element tensor of the compute dtype, so that cast keeps the compute dtype
    (the stored values are `qweight`). No adapter wraps a text encoder, so nothing else reads `weight`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # zero elements: on the CPU even for a layer built on the meta device (it has nothing to load)
        self.register_buffer("dtype_marker", torch.empty(0, dtype=self.compute_dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dtype_marker

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedTextLinear:
        super()._apply(fn, recurse)
        self._buffers["dtype_marker"] = self._buffers["dtype_marker"].to(dtype=self.compute_dtype)
        return self


def is_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, QuantizedLinear)


def quantised_sizes(model: torch.nn.Module, stored: Mapping[str, int] | None = None) -> tuple[int, int, str]:
    """(bytes the model would hold unquantised, bytes it holds, format) for a quantised base; the format is "" when
    no layer is quantised. Unquantised: each quantised layer's weight at its compute dtype. `stored`: bytes of the
    tensors kept elsewhere by name (blocks waiting in the block cache file, zero-element placeholders here), counted
    as they are stored there."""
    stored = stored or {}
    before = after = 0
    fmt = ""
    for prefix, module in model.named_modules():
        own = {name: _held_bytes(f"{prefix}.{name}" if prefix else name, tensor, stored)
               for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
        size = sum(own.values())
        after += size
        if isinstance(module, QuantizedLinear):
            fmt = module.format
            element = torch.empty((), dtype=module.compute_dtype).element_size()
            before += module.in_features * module.out_features * element + own.get("bias", 0)
        else:
            before += size
    return before, after, fmt


def _held_bytes(name: str, tensor: torch.Tensor, stored: Mapping[str, int]) -> int:
    if tensor.numel() == 0 and name in stored:  # a placeholder: its bytes wait elsewhere
        return stored[name]
    return tensor.numel() * tensor.element_size()


def quantizable_names(model: torch.nn.Module) -> list[str]:
    """Names of the Linears a quantised base stores quantised: attention and MLP inside the blocks (a layer
    wrapped by peft is named by its `base_layer`; the adapter's own Linears never count)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and _QUANTISED_LINEAR.fullmatch(name) and ".lora_" not in name]


def linear_formats(model: torch.nn.Module, precision: str, modulation: str | None = None) -> dict[str, str]:
    """Linear name -> the format it is stored in, for the Linears a `precision` base quantises (none for
    bf16/fp16/fp32) and, with `modulation`, FLUX.1's in-block modulation Linears in that format."""
    formats = {name: precision for name in quantizable_names(model)} if precision in FORMATS else {}
    if modulation is not None:
        _check_format(modulation)
        formats.update({name: modulation for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and _MODULATION_LINEAR.fullmatch(name)})
    return formats


def block_groups(names: list[str]) -> list[tuple[str | None, list[str]]]:
    """Tensor names grouped by the block they belong to (`transformer_blocks.3`, None outside the blocks), each
    block's names together, so a loader can hand a block on as soon as it is complete."""
    groups: dict[str | None, list[str]] = {}
    for name in sorted(names):
        match = _BLOCK_PREFIX.match(name)
        groups.setdefault(match.group(1) if match else None, []).append(name)
    return list(groups.items())


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: torch.nn.Module, fmt: str, compute_dtype: torch.dtype,
                   modulation: str | None = None) -> torch.nn.Module:
    """Quantise an already loaded transformer in place (the rest is cast to `compute_dtype`); returns it.

    Needs the whole model in memory first: to load a quantised base, `load_quantized_transformer` streams."""
    _check_format(fmt)
    for name, stored in linear_formats(model, fmt, modulation).items():
        _replace(model, name, QuantizedLinear.from_linear(model.get_submodule(name), stored, compute_dtype))
    return model.to(compute_dtype)


# ---------------------------------------------------------------------------------------------- streaming


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: one file, or the shards an index json names."""
    default = "diffusion_pytorch_model.safetensors"
    indexes = [folder / f"{default}.index.json"] if (folder / f"{default}.index.json").is_file() else []
    indexes = indexes or sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    files = [folder / default] if (folder / default).is_file() else sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise UserError(f"model.source: '{folder}' should hold one safetensors file or an index of shards "
                        f"(found: {found})")
    return {key: files[0] for key in safetensors_rows.names(files[0])}


def _read(file: Path, key: str, dtype: torch.dtype | None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A tensor (floating ones in `dtype`), or its rows start..stop-1, read from `file` (trainer/safetensors_rows.py:
    plain reads, no mapping)."""
    tensor = safetensors_rows.read(file, key, rows)
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _shape(file: Path, key: str) -> tuple[int, ...]:
    return safetensors_rows.shape(file, key)


def _few(names: list[str]) -> str:
    return ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load_quantized_transformer(folder: str | Path, model_class: type, precision: str, compute_dtype: torch.dtype,
                               work_device: torch.device | str | None = None, modulation: str | None = None,
                               sink: Any = None) -> torch.nn.Module:  # noqa: ANN401 - a block_store.BlockSink
    """The transformer in `folder` (config.json and safetensors) on the CPU, its block Linears stored as
    `precision` (FLUX.1's modulation as `modulation`, None: the compute dtype) and everything else in
    `compute_dtype`, frozen and in eval mode. `precision` may be bf16/fp16/fp32 too (a plain base streamed, for
    the block cache).

    Built on the meta device, then filled block by block; a quantised Linear's weight is read and quantised a
    slice of rows at a time, so peak RAM is the final size plus one slice (about 16 MiB of fp32). A `sink`
    (trainer.memory.block_store.BlockSink) takes each swapped block as soon as it is complete and frees it, or
    skips reading it when the block cache already holds it. The quantising arithmetic runs on `work_device`, by
    default the GPU when there is one."""
    from accelerate import init_empty_weights

    if precision not in PLAIN:
        _check_format(precision)
    if work_device is None:
        work_device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"model.source: no transformer config at '{folder / 'config.json'}'")
    with init_empty_weights():  # parameters on meta; buffers computed at init (if any) stay real
        model = model_class.from_config(model_class.load_config(folder))
    expected = set(model.state_dict())
    files = _weight_files(folder)
    missing, unexpected = sorted(expected - set(files)), sorted(set(files) - expected)
    if missing or unexpected:
        parts = ([f"it lacks {len(missing)} weights ({_few(missing)})"] if missing else []) + (
            [f"it has {len(unexpected)} weights this model has not ({_few(unexpected)})"] if unexpected else [])
        raise UserError(f"model.source: the transformer in '{folder}' does not fit {model_class.__name__} with its "
                        f"config.json: {'; '.join(parts)}")
    for name, stored in linear_formats(model, precision, modulation).items():
        linear = model.get_submodule(name)
        _replace(model, name, QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                              stored, compute_dtype, device="meta"))
    for prefix, keys in block_groups(list(files)):
        if sink is None or sink.wants(prefix):
            for key in keys:
                _load_tensor(model, key, files[key], compute_dtype, work_device)
        if sink is not None and prefix is not None:
            sink.complete(prefix, model.get_submodule(prefix))
        release_freed_heap()  # once per block: the freed slices would stay resident (trainer/memory/heap.py)
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()


def _load_tensor(model: torch.nn.Module, key: str, file: Path, compute_dtype: torch.dtype,
                 work_device: torch.device | str) -> None:
    """One tensor of the model from `file`: a quantised Linear's weight quantised as it streams, the rest read
    whole in the compute dtype."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    quantised = isinstance(module, QuantizedLinear) and attr == "weight"
    wanted = (module.out_features, module.in_features) if quantised else tuple(getattr(module, attr).shape)
    if _shape(file, key) != wanted:
        raise UserError(f"model.source: '{key}' in '{file.name}' has shape {_shape(file, key)}, the model's "
                        f"config.json wants {wanted}")
    if quantised:
        module.load_weight(lambda start, stop: _read(file, key, torch.float32, (start, stop)),
                           work_device=work_device)
    elif attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(_read(file, key, compute_dtype), requires_grad=False)
    else:
        module._buffers[attr] = _read(file, key, compute_dtype)
