"""`train.compile`: each transformer block's forward compiled with torch.compile, never the whole model.

Block swap rebinds a block's weights between calls and checkpointing recomputes blocks, both from hooks and
wrappers around the block's call; compiling only the forward leaves those outside the compiled code. A platform
where compilation fails (no C++ compiler, e.g. Windows without Visual Studio's build tools) falls back to the
eager blocks with one message; the session retries the step it failed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

BACKEND = "inductor"


def compile_failure(exc: BaseException) -> bool:
    """Whether `exc` is torch.compile failing to build code (rather than the model failing to run)."""
    from torch._dynamo import exc as dynamo_exc

    kinds: tuple[type[BaseException], ...] = (dynamo_exc.BackendCompilerFailed, dynamo_exc.TorchRuntimeError)
    inductor = getattr(torch._inductor.exc, "InductorError", None) if hasattr(torch, "_inductor") else None
    return isinstance(exc, kinds + ((inductor,) if inductor else ()))


def root_cause(exc: BaseException) -> str:
    """What the compiler itself said: dynamo wraps it (BackendCompilerFailed) with a header line of its own."""
    cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0][:200] if lines else ''}"


class CompiledBlocks:
    """The blocks' forwards replaced by compiled ones; `revert` puts the eager forwards back."""

    def __init__(self, blocks: Sequence[torch.nn.Module], backend: Any = None) -> None:  # noqa: ANN401
        self.blocks = list(blocks)
        self._eager = [block.forward for block in self.blocks]
        for block in self.blocks:
            # dynamic=False: a block sees one shape per bucket; marking dims dynamic costs speed
            block.forward = torch.compile(block.forward, backend=backend or BACKEND, dynamic=False)
        self.active = True

    def revert(self) -> None:
        for block, forward in zip(self.blocks, self._eager, strict=True):
            block.forward = forward
        self.active = False
        torch._dynamo.reset()  # drop the compiled code and its guards


def compiler_problem(device: torch.device) -> str:
    """Why torch.compile cannot build code for `device` ("" when it can): a tiny function compiled with the
    blocks' backend, forward and backward, so a missing C++ compiler shows before any block is touched."""
    probe = torch.compile(lambda x: (x * 2.0).sin().sum(), backend=BACKEND, dynamic=False)
    try:
        probe(torch.ones(8, device=device, requires_grad=True)).backward()
    except Exception as exc:  # noqa: BLE001 - whatever the compiler raises, the answer is the same: run eager
        return f"torch.compile does not work here ({root_cause(exc)})"
    return ""
