"""Optimisers and schedules (trainer/optimizers.py): they train, 8-bit state is 8-bit, state round-trips exactly."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from trainer.errors import UserError
from trainer.optimizers import (
    OPTIMIZERS,
    build_optimizer,
    build_scheduler,
    effective_learning_rate,
)
from trainer.state_file import read_state_file, write_state_file


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimiser's state tensors (moments, quantisation maps, step counters), each counted once."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0

    def add(value: object) -> None:
        nonlocal total
        if torch.is_tensor(value):
            key = (value.data_ptr(), value.numel(), value.dtype)
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)

    for state in optimizer.state.values():
        add(state)
    return total

# Learning rates for the toy problem below: AdamW-like ones at 1e-2 (a toy problem tolerates more than a LoRA),
# Lion at 3e-3 (its updates are sign-sized, so 3x lower than AdamW), Prodigy at its usual multiplier 1.0.
# Prodigy grows its step-size estimate from 1e-6 for ~60 steps before the loss moves, so it gets 80 steps.
SETTINGS = {
    "adamw": (1e-2, 30),
    "adamw8bit": (1e-2, 30),
    "lion8bit": (3e-3, 30),
    "adafactor": (1e-2, 30),
    "prodigy": (1.0, 80),
}


def regression_problem(device: str = "cpu") -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A 64×64 Linear (4160 parameters: its weight is big enough for bitsandbytes' 8-bit state) and a target."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(128, 64, generator=generator)
    target = inputs @ (torch.randn(64, 64, generator=generator) / 8).T
    torch.manual_seed(1)
    return torch.nn.Linear(64, 64).to(device), inputs.to(device), target.to(device)


def loss_of(layer: torch.nn.Linear, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(layer(inputs), target)


def train(layer: torch.nn.Linear, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, target: torch.Tensor,
          steps: int) -> None:
    for _ in range(steps):
        loss_of(layer, inputs, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def check_reduces_the_loss(name: str, device: str) -> None:
    learning_rate, steps = SETTINGS[name]
    layer, inputs, target = regression_problem(device)
    optimizer = build_optimizer(list(layer.parameters()), name, learning_rate, device_type=device)
    initial = loss_of(layer, inputs, target).item()
    train(layer, optimizer, inputs, target, steps)
    final = loss_of(layer, inputs, target).item()
    assert final < 0.5 * initial, (name, initial, final)
    assert optimizer_state_bytes(optimizer) > 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_the_loss(name):
    check_reduces_the_loss(name, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fused AdamW, bitsandbytes' CUDA kernels)")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_the_loss_on_cuda(name):
    check_reduces_the_loss(name, "cuda")


def state_dtypes(optimizer: torch.optim.Optimizer) -> set[torch.dtype]:
    return {value.dtype for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)}


def test_adamw8bit_keeps_8bit_state_smaller_than_adamw():
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        layer, inputs, target = regression_problem()
        optimizer = build_optimizer(list(layer.parameters()), name, 1e-3)
        train(layer, optimizer, inputs, target, 1)
        sizes[name] = optimizer_state_bytes(optimizer)
        if name == "adamw8bit":
            assert state_dtypes(optimizer) & {torch.uint8, torch.int8}
            weight_state = optimizer.state[layer.weight]
            assert weight_state["state1"].dtype == torch.uint8 and weight_state["state2"].dtype == torch.uint8
    # Two fp32 moments of 4160 elements each, plus two step counters.
    assert sizes["adamw"] == 2 * 4160 * 4 + 2 * 4
    # The 64×64 weight's moments take 1 byte per element; the 64-element bias stays fp32 (under 4096 elements).
    assert sizes["adamw8bit"] < 0.4 * sizes["adamw"], sizes


def test_lion8bit_keeps_one_8bit_moment():
    layer, inputs, target = regression_problem()
    optimizer = build_optimizer(list(layer.parameters()), "lion8bit", 1e-4)
    train(layer, optimizer, inputs, target, 1)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8
    assert "state2" not in optimizer.state[layer.weight]


def check_round_trip(name: str, device: str, tmp_path: Path) -> None:
    learning_rate, _ = SETTINGS[name]
    layer, inputs, target = regression_problem(device)
    optimizer = build_optimizer(list(layer.parameters()), name, learning_rate, device_type=device)
    train(layer, optimizer, inputs, target, 3)
    # through a state file, as a resume from disk does: no tensor is shared with the original
    write_state_file(tmp_path / "state.safetensors", {"optimizer": optimizer.state_dict()})
    resumed_layer = copy.deepcopy(layer)
    resumed = build_optimizer(list(resumed_layer.parameters()), name, learning_rate, device_type=device)
    resumed.load_state_dict(read_state_file(tmp_path / "state.safetensors")["optimizer"])
    train(layer, optimizer, inputs, target, 2)
    train(resumed_layer, resumed, inputs, target, 2)
    for original, copied in zip(layer.parameters(), resumed_layer.parameters(), strict=True):
        assert torch.equal(original, copied), name
    if name == "prodigy":
        assert resumed.param_groups[0]["d"] == optimizer.param_groups[0]["d"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_bit_identically(name, tmp_path):
    check_round_trip(name, "cpu", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fused AdamW, bitsandbytes' CUDA kernels)")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_on_cuda(name, tmp_path):
    check_round_trip(name, "cuda", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_is_fused_on_cuda():
    layer, _, _ = regression_problem("cuda")
    assert build_optimizer(list(layer.parameters()), "adamw", 1e-4, device_type="cuda").defaults["fused"]


def test_adamw_takes_weight_decay_and_betas():
    layer, _, _ = regression_problem()
    optimizer = build_optimizer(list(layer.parameters()), "adamw", 1e-4, weight_decay=0.1, betas=(0.8, 0.95))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-4, 0.1, (0.8, 0.95))
    assert not group["fused"]


def test_adafactor_uses_the_given_learning_rate():
    layer, inputs, target = regression_problem()
    optimizer = build_optimizer(list(layer.parameters()), "adafactor", 1e-3)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and not group["relative_step"] and not group["scale_parameter"]
    scheduler = build_scheduler(optimizer, "linear", 0, 10)
    train(layer, optimizer, inputs, target, 1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.9e-3)  # the scheduler drives it


def test_prodigy_warns_about_a_learning_rate_far_from_one():
    layer, _, _ = regression_problem()
    with pytest.warns(UserWarning, match="normally 1.0"):
        build_optimizer(list(layer.parameters()), "prodigy", 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = build_optimizer(list(layer.parameters()), "prodigy", 1.0)
    group = optimizer.param_groups[0]
    assert group["safeguard_warmup"] and group["use_bias_correction"] and group["weight_decay"] == 0.01


def test_effective_learning_rate_includes_prodigys_estimate():
    layer, inputs, target = regression_problem()
    optimizer = build_optimizer(list(layer.parameters()), "prodigy", 1.0)
    assert effective_learning_rate(optimizer) == pytest.approx(1e-6)
    train(layer, optimizer, inputs, target, 30)
    assert effective_learning_rate(optimizer) > 1e-6
    adamw = build_optimizer(list(layer.parameters()), "adamw", 3e-4)
    assert effective_learning_rate(adamw) == 3e-4


def test_missing_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    layer, _, _ = regression_problem()
    for name in ("adamw8bit", "lion8bit"):
        with pytest.raises(UserError, match=r"train\.optimizer.*bitsandbytes.*'adamw'"):
            build_optimizer(list(layer.parameters()), name, 1e-4)


def learning_rates(name: str, steps: list[int], warmup: int = 10, total: int = 100, base: float = 1.0) -> list[float]:
    """The scheduled learning rate after each of `steps` scheduler steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build_scheduler(optimizer, name, warmup, total)
    rates = {0: scheduler.get_last_lr()[0]}
    for step in range(1, max(steps) + 1):
        optimizer.step()
        scheduler.step()
        rates[step] = scheduler.get_last_lr()[0]
    return [rates[step] for step in steps]


STEPS = [0, 5, 10, 55, 100]  # start, mid-warmup, end of warmup, middle of the decay, max_steps


@pytest.mark.parametrize(("name", "expected"), [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("cosine", [0.0, 0.5, 1.0, 0.5, 0.0]),  # half a cosine: 45 of 90 decay steps is its midpoint
    ("linear", [0.0, 0.5, 1.0, 0.5, 0.0]),
    ("polynomial", [0.0, 0.5, 1.0, 0.5 * (1.0 - 1e-7) + 1e-7, 1e-7]),  # power 1 down to lr_end 1e-7
])
def test_scheduler_follows_its_definition(name, expected):
    assert learning_rates(name, STEPS) == pytest.approx(expected, abs=1e-12)


def test_cosine_is_a_cosine_between_warmup_and_the_end():
    (rate,) = learning_rates("cosine", [40])
    assert rate == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))


def test_polynomial_works_below_its_end_rate():
    assert learning_rates("polynomial", [0, 10, 100], base=1e-8) == pytest.approx([0.0, 1e-8, 0.0], abs=1e-15)


def test_scheduler_state_round_trips():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, "cosine", 10, 100)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = build_scheduler(resumed_optimizer, "cosine", 10, 100)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for _ in range(5):
        for each_optimizer, each_scheduler in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            each_optimizer.step()
            each_scheduler.step()
        assert resumed.get_last_lr() == scheduler.get_last_lr()
