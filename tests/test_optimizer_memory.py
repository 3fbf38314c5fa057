"""The optimiser on CPU copies and the optimiser fused into backward step like the plain optimiser."""

from __future__ import annotations

import torch

from trainer.memory.optimizer_memory import FusedBackward, OffloadedOptimizer, build_training_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)


def _constant(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def _train(model: torch.nn.Module, optimizer: object, scheduler: object, steps: int = 3, micro: int = 2) -> None:
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for index in range(micro):
            if isinstance(optimizer, FusedBackward):
                optimizer.stepping = index == micro - 1
            x = torch.randn(4, 8, generator=data)
            (model(x).pow(2).mean() / micro).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def test_offloaded_and_fused_match_the_plain_optimizer() -> None:
    reference = _model()
    optimizer, scheduler = build_training_optimizer(list(reference.parameters()), _adamw, _constant,
                                                    offload=False, fused_backward=False, max_grad_norm=0)
    _train(reference, optimizer, scheduler)
    for offload, fused in [(True, False), (False, True), (True, True)]:
        model = _model()
        optimizer, scheduler = build_training_optimizer(list(model.parameters()), _adamw, _constant,
                                                        offload=offload, fused_backward=fused, max_grad_norm=0)
        _train(model, optimizer, scheduler)
        for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=f"offload={offload} fused={fused}")
        if fused:
            assert optimizer.steps_taken == 3 * 4  # every parameter, once per step, inside the backward
            assert all(p.grad is None for p in model.parameters())  # gradients freed as soon as used


def test_fused_backward_clips_each_parameter_on_its_own() -> None:
    model = _model()
    sgd = lambda params: torch.optim.SGD(params, lr=1.0)  # noqa: E731 - the update is the clipped gradient
    fused = FusedBackward(list(model.parameters()), sgd, _constant, max_grad_norm=1e-3)
    fused.stepping = True
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8)).pow(2).mean().mul(100).backward()
    for old, param in zip(before, model.parameters(), strict=True):
        assert (old - param.detach()).norm() <= 1e-3 * (1 + 1e-5)


def test_offloaded_state_round_trips() -> None:
    model = _model()
    optimizer = OffloadedOptimizer(list(model.parameters()), _adamw)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()
    state = optimizer.state_dict()
    other = OffloadedOptimizer(list(model.parameters()), _adamw)
    other.load_state_dict(state)
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert all(torch.equal(m, p.detach()) for m, p in zip(other.masters, model.parameters(), strict=True))
