"""Block swap: exact against the unswapped model on the demo transformers, and its scheduling as decisions.

The CPU stands in for the device (CpuTransfer), so packing, rebinding and the ring run for real; FakeTransfer
records what a GPU would be told to do (which block into which slot, on which stream, which waits).
"""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer import registry
from trainer.adapters import add_adapter
from trainer.families import family_ops
from trainer.memory.block_swap import ALIGN, BlockSwapper, CpuTransfer, flux_blocks

FAMILIES = ("flux2", "flux1")
STEPS = 3


def _phase() -> str:
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


class FakeTransfer(CpuTransfer):
    """A pretend GPU: copies really happen (on the CPU) so the model computes; every decision is logged."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.hosts: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []
        self.finishes = 0

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.hosts.append(super().host_buffer(nbytes))
        return self.hosts[-1]

    def slot_buffer(self, nbytes: int) -> torch.Tensor:
        self.slots.append(super().slot_buffer(nbytes))
        return self.slots[-1]

    def load(self, block: int, slot: int, source: torch.Tensor, target: torch.Tensor) -> None:
        # host to device only: from a master into the named slot, never the other way round
        assert any(_within(source, host) for host in self.hosts), "load source is not a host master"
        assert _within(target, self.slots[slot]), "load target is not the named slot"
        self.log.append(("load", block, slot, "side stream", _phase()))
        super().load(block, slot, source, target)

    def wait(self, slot: int) -> None:
        self.log.append(("wait", slot, "event"))

    def finish(self) -> None:
        self.finishes += 1


def _within(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= end


def _log_compute(blocks: list[nn.Module], log: list[tuple]) -> None:
    """Call after install(): "begin" is logged before the swapper's pre-hook, "compute" after it (right before
    the block's forward), "end" after the forward."""
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=index: log.append(("begin", i, _phase())), prepend=True)
        block.register_forward_pre_hook(lambda m, a, i=index: log.append(("compute", i, _phase())))
        block.register_forward_hook(lambda m, a, o, i=index: log.append(("end", i, _phase())))


def check_decisions(log: list[tuple], swapped: int, slots: int) -> tuple[list[list[int]], list[int]]:
    """Every rule of the schedule, checked on the log. Returns the loads of each pass (a run of forward or of
    backward computes) and the blocks loaded on demand (in the pre-hook of the block itself, not ahead).

    In backward a block is in use from its recomputation until the next block's recomputation begins (the
    autograd engine runs all of its gradient nodes first); in forward from its pre-hook to its end."""
    occupant: dict[int, int] = {}
    unwaited: set[int] = set()
    current = None
    loads_since_begin: set[int] = set()
    passes: list[list[int]] = []
    demand: list[int] = []
    phase = None
    for entry in log:
        kind = entry[0]
        if kind == "load":
            _, block, slot, stream, load_phase = entry
            assert load_phase == phase and stream == "side stream" and slot == block % slots, entry  # round-robin
            assert occupant.get(slot) is None or occupant[slot] != current, f"slot {slot} overwritten in use"
            occupant[slot] = block
            unwaited.add(slot)
            loads_since_begin.add(block)
            passes[-1].append(block)
        elif kind == "wait":
            assert entry[2] == "event"
            unwaited.discard(entry[1])
        elif kind == "begin":
            _, block, begin_phase = entry
            if begin_phase != phase:
                passes.append([])
                phase = begin_phase
            current = block
            loads_since_begin = set()
        elif kind == "compute":
            _, block, _ = entry
            assert block == current
            if block < swapped:
                slot = block % slots
                assert occupant.get(slot) == block, f"block {block} computes without being loaded"
                assert slot not in unwaited, f"block {block} computes before the compute stream waited for its copy"
                if block in loads_since_begin:
                    demand.append(block)
        elif kind == "end" and entry[2] == "forward":
            current = None  # in backward the block's gradient nodes still follow its recomputation
    return passes, demand


# ---------------------------------------------------------------------------------------------- demo transformers


@pytest.fixture(scope="module")
def models(demo_dir: Path) -> dict[str, tuple[nn.Module, dict]]:
    """Per family: the demo transformer with a LoRA (non-zero B, so every gradient is non-trivial), gradient
    checkpointing on, and fixed inputs."""
    out = {}
    for family in FAMILIES:
        flavour = registry.get_flavour(family, "demo")
        skip = tuple(c for c in flavour.components if c != "transformer")
        transformer = family_ops(family).load_pipeline(str(demo_dir / family), flavour, torch.float32,
                                                       skip=skip).transformer
        add_adapter(transformer, family, type="lora", rank=4, alpha=4.0, dropout=0.0, targets="all",
                    init="default")
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in transformer.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        transformer.enable_gradient_checkpointing()
        out[family] = (transformer, _inputs(family))
    return out


def _inputs(family: str) -> dict:
    generator = torch.Generator().manual_seed(3)
    channels, text_dim = (128, 48) if family == "flux2" else (16, 32)
    text = {"prompt_embeds": torch.randn(2, 8, text_dim, generator=generator)}
    if family == "flux1":
        text["pooled_prompt_embeds"] = torch.randn(2, text_dim, generator=generator)
    return {
        "noisy": torch.randn(2, channels, 4, 4, generator=generator),
        "target": torch.randn(2, channels, 4, 4, generator=generator),
        "sigmas": torch.tensor([0.3, 0.8]),
        "text": text,
        "guidance": torch.tensor([3.5, 3.5]) if family == "flux1" else None,
    }


def _predict(family: str, transformer: nn.Module, inputs: dict) -> torch.Tensor:
    return family_ops(family).predict(transformer, inputs["noisy"], inputs["sigmas"], inputs["text"],
                                      inputs["guidance"])


def _train(family: str, transformer: nn.Module, inputs: dict) -> tuple[list, list]:
    """STEPS optimiser steps; the loss and every LoRA gradient of each step."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses, grads = [], []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(_predict(family, transformer, inputs), inputs["target"])
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.detach().to("cpu").clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


@pytest.fixture(scope="module")
def references(models: dict) -> dict:
    out = {}
    for family, (base, inputs) in models.items():
        transformer = copy.deepcopy(base)
        with torch.no_grad():
            sampled = _predict(family, transformer, inputs)
        trained = _train(family, transformer, inputs)
        with torch.no_grad():
            out[family] = (trained, sampled, _predict(family, transformer, inputs))
    return out


def _swap_counts(family: str) -> list[int]:
    most = registry.get_flavour(family, "demo").max_blocks_to_swap
    total = registry.get_flavour(family, "demo").total_blocks
    return sorted({1, most // 2, most, total})  # the registry's max, and every block (as for text encoders)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefetch", [1, 2])
def test_training_is_bit_identical_to_the_unswapped_model(family: str, prefetch: int, models: dict,
                                                          references: dict) -> None:
    base, inputs = models[family]
    (ref_losses, ref_grads), _, ref_trained = references[family]
    for swapped in _swap_counts(family):
        transformer = copy.deepcopy(base)
        log: list[tuple] = []
        swapper = BlockSwapper(flux_blocks(transformer), swapped, "cpu", prefetch=prefetch,
                               transfer=FakeTransfer(log)).install()
        _log_compute(flux_blocks(transformer), log)
        losses, grads = _train(family, transformer, inputs)
        for step in range(STEPS):
            assert torch.equal(losses[step], ref_losses[step]), f"swapped {swapped}: loss differs at step {step}"
            for got, want in zip(grads[step], ref_grads[step], strict=True):
                assert torch.equal(got, want), f"swapped {swapped}: a LoRA gradient differs at step {step}"
        slots = min(prefetch + 1, swapped)
        passes, demand = check_decisions(log, swapped, slots)
        assert demand == [0], "every block but the very first is prefetched ahead of its use"
        forwards, backwards = passes[0::2], passes[1::2]
        assert len(forwards) == len(backwards) == STEPS
        assert forwards[0] == list(range(swapped)), "the first forward loads every swapped block, in order"
        # The blocks in the ring at the turn are not reloaded: the backward loads the others in reverse order, and
        # the next forward finds the first blocks still there.
        assert all(b == list(range(swapped - slots - 1, -1, -1)) for b in backwards)
        assert all(f == list(range(slots, swapped)) for f in forwards[1:])
        assert swapper.stats.demand_loads == 1  # only the very first block waited for a copy it had not prefetched
        assert swapper.transfer.finishes == 0, "the CPU never blocks on a copy while training"

        swapper.stats.reset()
        with torch.no_grad():
            assert torch.equal(_predict(family, transformer, inputs), ref_trained)
        swapper.remove()
        assert swapper.transfer.finishes == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_no_grad_forward_and_remove_give_the_same_outputs(family: str, models: dict, references: dict) -> None:
    base, inputs = models[family]
    _, ref_sampled, _ = references[family]
    transformer = copy.deepcopy(base)
    blocks = flux_blocks(transformer)
    swapper = BlockSwapper(blocks, len(blocks), "cpu", prefetch=1).install()
    with torch.no_grad():
        for _ in range(2):  # the second pass starts with the ring holding the last blocks
            assert torch.equal(_predict(family, transformer, inputs), ref_sampled)
    assert swapper.stats.copies == 2 * len(blocks) and swapper.stats.demand_loads == 2
    swapper.remove()
    assert all(not block._forward_pre_hooks for block in blocks)
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    assert all(p.device.type == "cpu" and p.numel() > 0 for p in frozen)
    with torch.no_grad():
        assert torch.equal(_predict(family, transformer, inputs), ref_sampled)


def test_install_releases_the_original_storage(models: dict) -> None:
    base, inputs = models["flux2"]
    transformer = copy.deepcopy(base)
    blocks = flux_blocks(transformer)
    swapped = 3
    frozen = [p for b in blocks[:swapped] for p in b.parameters() if not p.requires_grad]
    storages = [weakref.ref(t.untyped_storage()) for t in frozen]
    before = [t.detach().clone() for t in frozen]
    transfer = FakeTransfer([])
    swapper = BlockSwapper(blocks, swapped, "cpu", prefetch=1, transfer=transfer).install()
    gc.collect()
    assert all(ref() is None for ref in storages), "an original weight storage is still alive after install()"
    assert all(t.numel() == 0 for t in frozen), "unloaded blocks point at empty placeholders"
    assert swapper.host_bytes >= sum(t.numel() * t.element_size() for t in before)
    with torch.no_grad():
        _predict("flux2", transformer, inputs)
    resident = [b for b in range(swapped) if any(t.numel() for t in blocks[b].parameters() if not t.requires_grad)]
    assert resident == [1, 2]  # the ring's two slots hold the last two swapped blocks
    for t in [t for b in resident for t in blocks[b].parameters() if not t.requires_grad]:
        assert any(_within(t, slot) for slot in transfer.slots), "a loaded weight is not a view of a slot"
    trainable = [p for b in blocks[:swapped] for p in b.parameters() if p.requires_grad]
    assert trainable and all(not any(_within(p, s) for s in transfer.slots) for p in trainable)
    swapper.remove()
    for t, want in zip(frozen, before, strict=True):
        assert torch.equal(t, want) and not any(_within(t, h) for h in transfer.hosts)


def test_a_grad_forward_without_checkpointing_is_refused(models: dict) -> None:
    base, inputs = models["flux1"]
    transformer = copy.deepcopy(base)
    transformer.disable_gradient_checkpointing()
    swapper = BlockSwapper(flux_blocks(transformer), 2, "cpu").install()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        _predict("flux1", transformer, inputs)
    with torch.no_grad():  # evaluation saves nothing: allowed
        _predict("flux1", transformer, inputs)
    swapper.remove()


def test_text_encoder_layers_stream_forward_only(demo_dir: Path) -> None:
    flavour = registry.get_flavour("flux2", "demo")
    ops = family_ops("flux2")
    pipe = ops.load_pipeline(str(demo_dir / "flux2"), flavour, torch.float32, skip=("transformer", "vae"))
    prompts = ["a red circle", "a blue square on a green background"]
    reference = ops.encode_prompts(pipe, prompts, flavour)["prompt_embeds"]
    layers = list(pipe.text_encoder.model.layers)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())  # the loader freezes text encoders
    pipe.text_encoder.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze the base model"):  # layers that would train are refused
        BlockSwapper(layers, len(layers), "cpu").install()
    pipe.text_encoder.requires_grad_(False)
    log: list[tuple] = []
    swapper = BlockSwapper(layers, len(layers), "cpu", prefetch=1, transfer=FakeTransfer(log)).install()
    _log_compute(layers, log)
    for _ in range(2):
        assert torch.equal(ops.encode_prompts(pipe, prompts, flavour)["prompt_embeds"], reference)
    passes, demand = check_decisions(log, len(layers), 2)
    assert all(e[-1] == "forward" for e in log if e[0] in ("load", "compute"))
    # the second encoding finds layers 2 (slot 0) and 1 (slot 1) from the first: it reloads 0, keeps 1, loads 2
    assert passes == [[0, 1, 2, 0, 2]] and demand == [0, 0]
    assert swapper.stats.copies == 5 and swapper.stats.demand_loads == 2
    swapper.remove()
    assert torch.equal(ops.encode_prompts(pipe, prompts, flavour)["prompt_embeds"], reference)


# ---------------------------------------------------------------------------------------------- a longer stack


class _Block(nn.Module):
    """Frozen tensors of many dtypes and odd sizes (as quantised layers keep them), and a trainable low-rank pair."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(width, width, generator=generator) / width**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(width, generator=generator).to(torch.bfloat16), requires_grad=False)
        self.register_buffer("fp8", torch.randn(width, generator=generator).to(torch.float8_e4m3fn))
        self.register_buffer("codes", torch.randint(-8, 8, (width,), generator=generator, dtype=torch.int8))
        self.register_buffer("odd", torch.randint(0, 255, (3,), generator=generator, dtype=torch.uint8))
        self.register_buffer("mask", torch.rand(width, generator=generator) > 0.2, persistent=False)
        self.down = nn.Parameter(torch.randn(width, 2, generator=generator) * 0.1)
        self.up = nn.Parameter(torch.randn(2, width, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fp8.float() + self.codes.float() * 0.01 + self.odd.float().sum() * 1e-3
        h = torch.tanh(x @ self.weight.T + self.bias.float()) * scale * self.mask
        return x + h + (x @ self.down) @ self.up


class _Stack(nn.Module):
    def __init__(self, count: int = 8, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width, seed) for seed in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return x


def _stack_step(stack: _Stack) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    loss = stack(x).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in stack.parameters() if p.requires_grad]
    stack.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("swapped, prefetch", [(6, 1), (6, 2), (8, 2), (5, 0)])
def test_schedule_on_a_longer_stack(swapped: int, prefetch: int) -> None:
    reference = _Stack()
    want = [_stack_step(reference) for _ in range(2)]
    stack = _Stack()
    log: list[tuple] = []
    transfer = FakeTransfer(log)
    swapper = BlockSwapper(list(stack.blocks), swapped, "cpu", prefetch=prefetch, transfer=transfer).install()
    _log_compute(list(stack.blocks), log)
    masters = [h.clone() for h in transfer.hosts]
    for step in range(2):
        loss, grads = _stack_step(stack)
        assert torch.equal(loss, want[step][0])
        assert all(torch.equal(g, w) for g, w in zip(grads, want[step][1], strict=True))
    assert all(torch.equal(h, m) for h, m in zip(transfer.hosts, masters, strict=True)), "a master was written"
    slots = min(prefetch + 1, swapped)
    passes, demand = check_decisions(log, swapped, slots)
    assert passes[0] == list(range(swapped)) and passes[2] == list(range(slots, swapped))
    assert passes[1] == passes[3] == list(range(swapped - slots - 1, -1, -1))
    # prefetch runs ahead: each load is issued while an earlier block computes, except the very first (and all of
    # them without prefetch)
    assert demand == ([0] if prefetch else [b for p in passes for b in p])
    assert swapper.stats.demand_loads == len(demand) and swapper.stats.copies == sum(map(len, passes))
    for block, packed in enumerate(swapper._packed):
        spans = [span for _, span in packed.params] + [span for _, span in packed.buffers]
        assert len(spans) == 6 and all(span.offset % ALIGN == 0 for span in spans), f"block {block} layout"
    swapper.remove()
    for got, ref in zip([*stack.parameters(), *stack.buffers()], [*reference.parameters(), *reference.buffers()],
                        strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape and got.device.type == "cpu"
        if not got.requires_grad:  # every dtype restored bit for bit (float8 has no equality on the CPU)
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))
    with torch.no_grad():
        x = torch.randn(4, 16)
        assert torch.equal(stack(x), reference(x))


def test_arguments_are_checked() -> None:
    stack = _Stack(count=3)
    with pytest.raises(ValueError, match="blocks_to_swap"):
        BlockSwapper(list(stack.blocks), 4, "cpu")
    with pytest.raises(ValueError, match="swap_prefetch"):
        BlockSwapper(list(stack.blocks), 2, "cpu", prefetch=-1)
    shared = _Stack(count=3)
    shared.blocks[2].weight = shared.blocks[0].weight
    with pytest.raises(ValueError, match="shared"):
        BlockSwapper(list(shared.blocks), 1, "cpu").install()
    large_rank = _Stack(count=2)  # a LoRA may outweigh a heavily quantised base: still swapped
    large_rank.blocks[0].down = nn.Parameter(torch.zeros(16, 64))
    large_rank.blocks[0].up = nn.Parameter(torch.zeros(64, 16))
    BlockSwapper(list(large_rank.blocks), 1, "cpu").install().remove()
    unfrozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="freeze the base model"):
        BlockSwapper(list(unfrozen), 1, "cpu").install()
    swapper = BlockSwapper(list(stack.blocks), 2, "cpu").install()
    with pytest.raises(RuntimeError, match="already installed"):
        swapper.install()
    assert swapper.is_swapped(stack.blocks[1]) and not swapper.is_swapped(stack.blocks[2])
    assert swapper.swapped_block_set() == {stack.blocks[0], stack.blocks[1]}
    swapper.remove()

