"""TREAD: training-time token routing around a span of transformer blocks.

While training, a random subset of the IMAGE tokens skips the blocks `start_block..end_block` (counted over
the transformer's double blocks, then its single blocks, from 0; negative numbers count from the end as in
Python). At the span's first block the routed tokens are taken out of the image stream and the RoPE rows are
sliced to match, so the kept tokens keep their true positions; the span runs on the kept tokens and all text
tokens; after the span's last block the routed tokens are put back unchanged. Evaluation forwards
(`transformer.eval()`) are never routed.

Selection is uniform at random, one kept set shared by the whole batch:
- uniform, because every image position then takes the span with the same probability, as in the TREAD paper's
  random routing; scoring by activation norm would systematically give the span's computation to the same
  (high-norm) tokens and bias what the adapter learns against inference, where every token takes every block;
- shared across the batch, because diffusers' FLUX attention applies RoPE as one [S, D] table for the whole
  batch (`apply_rotary_emb`), so a shared kept set slices it exactly without touching the attention code.

How the two FLUX families pass their streams (diffusers 0.42), all handled by the same hooks:
- double blocks, both families: `block(hidden_states=image, encoder_hidden_states=text, <modulation>,
  image_rotary_emb=(cos, sin) over text+image, ...)` returning `(text, image)`;
- FLUX.1 single blocks: the same separate streams and return value;
- FLUX.2 single blocks: `encoder_hidden_states=None` and `hidden_states` = text and image concatenated (the model
  concatenates after its double blocks) returning the concatenated stream.
With gradient checkpointing diffusers passes the same values positionally through `module.__call__`, so module
hooks fire in the forward and again in the backward's recomputation; the recomputation finds its forward's kept
set by the RoPE table it is called with, so it repeats exactly what the forward did.

This module imports torch lazily: `TreadConfig` and `validate_tread` are used by the torch-free spec.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

RATIO_KEY = "advanced.tread_selection_ratio"
START_KEY = "advanced.tread_start_block"
END_KEY = "advanced.tread_end_block"


@dataclass(frozen=True)
class TreadConfig:
    selection_ratio: float  # share of image tokens routed around the span, in [0, 1); 0 routes none
    start_block: int  # first block of the span; negative counts from the end
    end_block: int  # last block of the span (inclusive); negative counts from the end


def resolve_span(config: TreadConfig, total_blocks: int) -> tuple[int, int]:
    """The span as non-negative block indices (negative indices count from the end)."""
    start = config.start_block + total_blocks if config.start_block < 0 else config.start_block
    end = config.end_block + total_blocks if config.end_block < 0 else config.end_block
    return start, end


def validate_tread(config: TreadConfig, total_blocks: int) -> list[tuple[str, str]]:
    """Every problem with `config` for a transformer of `total_blocks` blocks (double + single), as (key, what is
    wrong), or none."""
    problems = []
    ratio = config.selection_ratio
    if not 0.0 <= ratio < 1.0:
        problems.append((RATIO_KEY, f"must be at least 0 and below 1 (the share of image tokens that skip the "
                                    f"span), got {ratio}"))
    start, end = resolve_span(config, total_blocks)
    for key, given, index in ((START_KEY, config.start_block, start), (END_KEY, config.end_block, end)):
        if not 0 <= index < total_blocks:
            problems.append((key, f"{given} is outside this model's blocks: 0..{total_blocks - 1} (double blocks "
                                  f"first, then single blocks), or -{total_blocks}..-1 from the end"))
    if 0 <= start < total_blocks and 0 <= end < total_blocks and start > end:
        problems.append((START_KEY, f"{config.start_block} (block {start}) must not come after {END_KEY} "
                                    f"({config.end_block}, block {end})"))
    return problems


def transformer_blocks(transformer: Any) -> list[Any]:
    """The blocks TREAD counts: double blocks (`transformer_blocks`) then `single_transformer_blocks`."""
    try:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    except AttributeError as error:
        raise TypeError(f"TREAD routes FLUX transformers (double and single blocks); "
                        f"{type(transformer).__name__} has no {error.name}") from None


def kept_token_count(image_tokens: int, selection_ratio: float) -> int:
    """How many image tokens take the span: all but floor(ratio x tokens), so at least one."""
    return image_tokens - int(image_tokens * selection_ratio)


@contextmanager
def tread_routing(transformer: Any, config: TreadConfig, generator: torch.Generator) -> Iterator[None]:
    """Route image tokens around the span in every training-mode forward made inside the block.

    One draw from `generator` per routed forward, when the transformer is called (none in eval mode, none at
    ratio 0). With gradient checkpointing on, call `backward()` inside the block too: the recomputation needs the
    hooks. Wrapping the whole training loop is the intended use; validation switches the model to eval() and is
    then not routed. Gradient checkpointing must be non-reentrant (diffusers' default); a reentrant one is refused.
    """
    blocks = transformer_blocks(transformer)
    problems = validate_tread(config, len(blocks))
    if problems:
        raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
    router = _Router(transformer, blocks, config, generator)
    try:
        yield
    finally:
        router.remove()


class _Route:
    """One routed forward: which image tokens take the span, and what the span's end needs to put them back."""

    def __init__(self, text_len: int, image_len: int, kept: torch.Tensor, grad_enabled: bool):
        # The forward's RoPE table, set when the span starts: it identifies the forward to its recomputations.
        self.rope_key: weakref.ref | None = None
        self.text_len = text_len
        self.image_len = image_len
        self.kept = kept  # sorted image-token indices, on the stream's device
        self.grad_enabled = grad_enabled
        self.sliced_rope: Any = None
        self._started = False
        self._source: Any = None  # the span's input stream, held from the span's start to its end
        self._source_is_joint = False
        self._image_shape: tuple[int, ...] = ()

    def gather(self, hidden: torch.Tensor, joint: bool) -> torch.Tensor:
        """The span's input: the kept image tokens (after all text tokens when the stream is joint)."""
        import torch

        image = hidden[:, self.text_len:] if joint else hidden
        if image.shape[1] != self.image_len:
            raise RuntimeError(f"TREAD: the image stream has {image.shape[1]} tokens at the span's start, "
                               f"expected {self.image_len}")
        if not self._started:  # the forward itself, not a checkpoint recomputation
            self._started = True
            self._source, self._source_is_joint, self._image_shape = hidden, joint, tuple(image.shape)
        kept = image.index_select(1, self.kept)
        return torch.cat([hidden[:, :self.text_len], kept], dim=1) if joint else kept

    def scatter(self, kept_image: torch.Tensor) -> torch.Tensor:
        """The full image stream: the span's output for the kept tokens, the span's input for the others."""
        source, self._source = self._source, None
        if source is None:
            # Only a gradient checkpointing recomputation of the span's last block comes back here. Its output is
            # discarded (the backward uses only what the recomputed ops save, and this scatter saves just the
            # indices), so a zero stream of the right shape serves and the forward's stream need not be kept.
            image = kept_image.new_zeros(self._image_shape)
        else:
            image = source[:, self.text_len:] if self._source_is_joint else source
        return image.to(kept_image.dtype).index_copy(1, self.kept, kept_image)

    def rope(self, rope: Any) -> Any:
        """The RoPE table restricted to all text rows and the kept image rows, in that order."""
        import torch

        if self.sliced_rope is None:
            table = rope[0] if isinstance(rope, tuple | list) else rope
            if table.shape[0] != self.text_len + self.image_len:
                raise RuntimeError(f"TREAD: RoPE has {table.shape[0]} rows for {self.text_len} text and "
                                   f"{self.image_len} image tokens")
            rows = torch.cat([torch.arange(self.text_len, device=self.kept.device), self.kept + self.text_len])
            rows = rows.to(table.device)
            if isinstance(rope, tuple | list):
                self.sliced_rope = tuple(part.index_select(0, rows) for part in rope)
            else:
                self.sliced_rope = rope.index_select(0, rows)
        return self.sliced_rope


class _Router:
    def __init__(self, transformer: Any, blocks: list[Any], config: TreadConfig, generator: torch.Generator):
        self.transformer = transformer
        self.ratio = config.selection_ratio
        self.generator = generator
        self.start, self.end = resolve_span(config, len(blocks))
        self._pending: _Route | None = None  # drawn at the transformer's call, until its span starts
        self._routes: dict[int, _Route] = {}
        self._in_call: _Route | None = None  # the route of the span block being called right now
        self._signatures: dict[type, inspect.Signature] = {}
        self._handles = [
            transformer.register_forward_pre_hook(self._before_transformer, with_kwargs=True),
            transformer.register_forward_hook(self._after_transformer, always_call=True),
        ]
        for index in range(self.start, self.end + 1):
            hook = self._before_start if index == self.start else self._before_inner
            self._handles.append(blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
        self._handles.append(blocks[self.end].register_forward_hook(self._after_end, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._routes.clear()
        self._pending = self._in_call = None

    # ---------------------------------------------------------------- hooks

    def _bind(self, module: Any, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        signature = self._signatures.get(type(module))
        if signature is None:
            signature = self._signatures[type(module)] = inspect.signature(module.forward)
        return signature.bind(*args, **kwargs)

    def _before_transformer(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        self._pending = None
        if not module.training or self.ratio == 0.0:
            return
        bound = self._bind(module, args, kwargs).arguments
        # Inference-only inputs that index the image stream by position: leave such forwards unrouted.
        if bound.get("kv_cache_mode") is not None or bound.get("controlnet_block_samples") is not None \
                or bound.get("controlnet_single_block_samples") is not None:
            return
        if "attention_mask" in (bound.get("joint_attention_kwargs") or {}):
            raise RuntimeError("TREAD does not slice attention masks; turn advanced.tread off for this job")
        hidden = bound["hidden_states"]  # every image token the blocks will see, before the embedding
        image_len = hidden.shape[1]
        kept_len = kept_token_count(image_len, self.ratio)
        if kept_len == image_len:
            return
        # Drawn here, before this forward queues any GPU work, and copied without making the host wait for the
        # device: a blocking copy in the middle of the forward would stall the CPU/GPU pipeline.
        order = torch.randperm(image_len, generator=self.generator, device=self.generator.device)
        kept = order[:kept_len].sort().values
        if hidden.device.type == "cuda" and kept.device.type == "cpu":
            kept = kept.pin_memory().to(hidden.device, non_blocking=True)
        else:
            kept = kept.to(hidden.device)
        self._pending = _Route(bound["encoder_hidden_states"].shape[1], image_len, kept, torch.is_grad_enabled())

    def _after_transformer(self, module: Any, args: tuple, output: Any) -> None:
        self._pending = None  # also when the forward failed before the span

    def _find_route(self, rope: Any) -> _Route | None:
        key = _rope_key(rope)
        route = self._routes.get(id(key)) if key is not None else None
        return route if route is not None and route.rope_key is not None and route.rope_key() is key else None

    def _start_route(self, rope: Any) -> _Route | None:
        """The pending route, now that its forward reaches the span, registered under the forward's RoPE table."""
        route, self._pending = self._pending, None
        key = _rope_key(rope)
        if route is None or key is None:
            return None
        for stale in [k for k, r in self._routes.items() if r.rope_key is None or r.rope_key() is None]:
            del self._routes[stale]  # forwards whose graphs (and RoPE tables) are gone
        route.rope_key = weakref.ref(key)
        self._routes[id(key)] = route
        return route

    def _before_start(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        import torch

        bound = self._bind(module, args, kwargs)
        hidden = bound.arguments["hidden_states"]
        joint = bound.arguments.get("encoder_hidden_states") is None
        rope = bound.arguments.get("image_rotary_emb")
        if self._pending is not None:  # a forward reaching its span
            route = self._start_route(rope)
        else:  # a checkpoint recomputation in the backward (or an unrouted forward): find its forward's route
            route = self._find_route(rope)
        self._in_call = route
        if route is None:
            return None
        if route.grad_enabled and not torch.is_grad_enabled():
            raise RuntimeError("TREAD needs non-reentrant gradient checkpointing (use_reentrant=False, diffusers' "
                               "default): the routed tokens bypass the span outside the checkpointed call")
        bound.arguments["hidden_states"] = route.gather(hidden, joint)
        bound.arguments["image_rotary_emb"] = route.rope(rope)
        return bound.args, bound.kwargs

    def _before_inner(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bound = self._bind(module, args, kwargs)
        rope = bound.arguments.get("image_rotary_emb")
        route = self._in_call = self._find_route(rope)
        if route is None:
            return None
        bound.arguments["image_rotary_emb"] = route.rope(rope)
        return bound.args, bound.kwargs

    def _after_end(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        import torch

        route, self._in_call = self._in_call, None
        if route is None:
            return None
        if isinstance(output, tuple):  # (text, image), every block but FLUX.2's single ones
            text, kept_image = output
            return text, route.scatter(kept_image)
        text, kept_image = output[:, :route.text_len], output[:, route.text_len:]  # FLUX.2 single: joint stream
        return torch.cat([text, route.scatter(kept_image)], dim=1)


def _rope_key(rope: Any) -> Any:
    """The tensor that identifies a forward: the first RoPE table, computed afresh by each transformer call."""
    if rope is None:
        return None
    return rope[0] if isinstance(rope, tuple | list) else rope
