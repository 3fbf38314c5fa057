"""Whole transformer state dicts between the diffusers and BFL (ComfyUI) layouts, for the tests: they write BFL
files from the demo models and check the trainer's streaming reader (trainer/sources/single_file.py) against a
plain conversion. The trainer itself only streams, tensor by tensor."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from trainer.sources.transformer_keys import Plan, bfl_shapes, transformer_plan


def diffusers_to_bfl(state_dict: dict[str, Tensor], family: str, prefix: str = "") -> dict[str, Tensor]:
    """A diffusers FLUX transformer state dict in BFL layout (each key under `prefix`, e.g. BFL_PREFIX), as
    BFL's and ComfyUI's checkpoints store it."""
    import torch

    shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    plan = transformer_plan(family, shapes)
    out = {key: torch.empty(shape, dtype=_dtype_of(plan, state_dict, key))
           for key, shape in bfl_shapes(plan, shapes).items()}
    for name, pieces in plan.items():
        row = 0
        for piece in pieces:
            count = piece.stop - piece.start
            out[piece.key][piece.start:piece.stop] = state_dict[name][row:row + count]
            row += count
    return {prefix + key: tensor for key, tensor in out.items()}


def _dtype_of(plan: Plan, state_dict: dict[str, Tensor], key: str) -> Any:  # noqa: ANN401 - a torch.dtype
    return next(state_dict[name].dtype for name, pieces in plan.items() if any(p.key == key for p in pieces))


def bfl_to_diffusers(state_dict: dict[str, Tensor], family: str,
                     shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The inverse: a BFL state dict (prefix already stripped) as the diffusers model with `shapes` names it."""
    import torch

    return {name: torch.cat([state_dict[p.key][p.start:p.stop] for p in pieces])
            for name, pieces in transformer_plan(family, shapes).items()}
