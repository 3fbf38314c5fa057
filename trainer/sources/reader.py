"""Reading tensors from one single file, a slice of rows at a time, fp8 weights dequantised with their scales.

fp8 files as users have them: ComfyUI's `*_fp8_e4m3fn.safetensors` (a plain cast, no scales), its
`*_fp8_scaled` / `fp8mixed` files (`<layer>.scale_weight` or `<layer>.weight_scale`, one fp32 scale per tensor,
W = stored * scale) and BFL's fp8 releases (`weight_scale`, the same rule). Input scales (`scale_input`,
`input_scale`) only matter to fp8 matrix multiplies at inference and are ignored. Block-scaled or packed 4-bit
formats (nvfp4, mxfp8: U8 values with block scales) are refused with a message.

Reads are plain reads of the bytes wanted (trainer/safetensors_rows.py): no file is mapped, so none is refused
for being larger than RAM and no page read stays resident.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.sources.recognise import QUANT_SUFFIXES, TensorInfo, read_header
from trainer.sources.transformer_keys import Piece

_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class FileReader:
    """The tensors of one safetensors file under `prefix` (stripped from the names it gives and takes)."""

    def __init__(self, path: str | Path, prefix: str = "", field: str = "model") -> None:
        self.path = Path(path)
        self.prefix = prefix
        self.field = field  # the spec key named in messages, e.g. model.transformer
        self.infos: dict[str, TensorInfo] = {name[len(prefix):]: info for name, info in read_header(path).items()
                                             if name.startswith(prefix)}

    def names(self) -> list[str]:
        """The weight names (quantisation side data left out)."""
        return [n for n in self.infos if not n.endswith(QUANT_SUFFIXES) and n != "scaled_fp8"]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def _raw(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from trainer import safetensors_rows

        return safetensors_rows.read(self.path, self.prefix + name, rows)

    def _scale_name(self, name: str) -> str | None:
        stem = name.removesuffix(".weight")
        for candidate in (f"{stem}.scale_weight", f"{stem}.weight_scale"):
            if candidate in self.infos:
                return candidate
        return None

    def _check_readable(self, name: str) -> None:
        if self.infos[name].dtype not in _FLOATS and name.endswith((".weight", ".scale", ".bias")):
            raise UserError(f"{self.field}: '{self.path.name}' stores '{name}' as {self.infos[name].dtype} (a packed "
                            "4-bit or block-scaled format such as nvfp4) that this trainer cannot read; use a bf16, "
                            "fp16 or fp8 file")

    def scale(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """The fp32 scale of rows start..stop-1 of an fp8 weight, shaped to broadcast over them; None when the
        tensor is stored unscaled."""
        scale_name = self._scale_name(name)
        if scale_name is None:
            return None
        scale = self._raw(scale_name).float()
        if scale.numel() == 1:
            return scale.reshape(())
        if scale.shape[0] == self.shape(name)[0] and scale.numel() == scale.shape[0]:
            return scale.reshape(-1)[start:stop].reshape(-1, *([1] * (len(self.shape(name)) - 1)))
        raise UserError(f"{self.field}: '{self.path.name}' scales '{name}' by blocks ({scale_name} has shape "
                        f"{tuple(scale.shape)}); only one scale per tensor or per row is supported")

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start..stop-1 of a tensor, floating ones dequantised and in `dtype`."""
        self._check_readable(name)
        tensor = self._raw(name, (start, stop))
        if not tensor.is_floating_point():
            return tensor
        scale = self.scale(name, start, stop) if tensor.element_size() == 1 else None
        if scale is not None:
            return (tensor.to(torch.float32) * scale).to(dtype)
        return tensor.to(dtype)

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A whole tensor (a 0-d one included), floating ones dequantised and in `dtype`."""
        shape = self.shape(name)
        if not shape:
            tensor = self._raw(name)
            return tensor.to(dtype) if tensor.is_floating_point() else tensor
        return self.rows(name, 0, shape[0], dtype)

    def gather(self, pieces: tuple[Piece, ...], start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start..stop-1 of the concatenation of `pieces` (each a row range of one file tensor)."""
        parts, offset = [], 0
        for piece in pieces:
            count = piece.stop - piece.start
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                first = piece.start + lo - offset
                parts.append(self.rows(piece.key, first, first + hi - lo, dtype))
            offset += count
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def stored_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 as stored (fp8 values without their scale)."""
        self._check_readable(name)
        return self._raw(name, (start, stop))

    def is_e4m3(self, name: str) -> bool:
        return self.infos[name].dtype == "F8_E4M3"
