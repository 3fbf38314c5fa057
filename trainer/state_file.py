"""Training states as one safetensors file: the tensors as tensors, everything else as JSON in its header.

Nothing is pickled, so reading a state someone sent you runs no code. The JSON keeps what optimiser and
scheduler state dicts hold beyond plain JSON: tuples, dicts with integer keys, and the positions of tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADER_KEY = "flux_studio_state"
_TENSOR, _TUPLE, _PAIRS = "__tensor__", "__tuple__", "__pairs__"
_SCALARS = (bool, int, float, str, type(None))


def _encode(value: Any, tensors: dict[str, Any], where: str) -> Any:  # noqa: ANN401 - any state value
    import torch

    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        # integer keys (optimiser state per parameter index) would come back as strings in a plain JSON object
        return {_PAIRS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise TypeError(f"training state: {where or 'the state'} is a {type(value).__name__}, which a state file "
                    "cannot hold (tensors, numbers, strings, lists, tuples and dicts only)")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:  # noqa: ANN401 - any state value
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _PAIRS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_PAIRS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def write_state_file(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` (not atomic by itself: callers write to a temporary file and rename it)."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    header = json.dumps(_encode(state, tensors, ""))
    save_file(tensors, str(path), metadata={HEADER_KEY: header})


def read_state_file(path: Path) -> dict[str, Any]:
    """The state `write_state_file` wrote; ValueError when the file is not one (or is torn)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        header = (handle.metadata() or {}).get(HEADER_KEY)
        if header is None:
            raise ValueError("not a training state file (no state header)")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iter
    state = _decode(json.loads(header), tensors)
    if not isinstance(state, dict):
        raise ValueError("not a training state file (the header is not a dict)")
    return state
