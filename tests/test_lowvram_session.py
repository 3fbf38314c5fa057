"""Every low-VRAM technique and every strategy trains the demo to the plain run's losses and LoRA weights.

On this CPU the techniques run their real code paths with the CPU as the device: swapped blocks are packed
into host buffers and copied into slot buffers before use, checkpoint inputs are copied out and back, the
optimiser steps on its own CPU copies or inside the backward. Tolerances: the recomputations and the
per-parameter optimisers reorder a few floating-point sums, so values agree to ~1e-6, not bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.memory.optimizer_memory import FusedBackward, OffloadedOptimizer
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths

STEPS = 3
# No clipping: the fused backward clips per parameter, which is its documented difference.
BASE = [f"train.max_steps={STEPS}", "sample.prompts=[]", "train.gradient_accumulation=2", "train.max_grad_norm=0",
        "train.mixed_precision='no'", "train.learning_rate=0.01", "lowvram.strategy='none'",
        # The preset's layers: the FLUX.1 demo job's LoRA also adapts time_text_embed, whose change reaches every
        # block's modulation, so the fused/offloaded runs' rounding drifts past 1e-5 (measured 1.2e-4, losses equal)
        "lora.targets='all'"]


def _train(demo_dir: Path, out: Path, job: str, *settings: str) -> tuple[Session, list[float], dict[str, torch.Tensor]]:
    """(session, losses, trained weights); the session's optimizer as it trained is kept in `session.trained_with`
    (end() sets `optimizer` to None)."""
    spec = resolve_paths(load_spec(demo_dir / job, [*BASE, f"output.dir='{out}'", *settings]), demo_dir)
    session = Session(spec)
    try:
        session.setup()
        session.train()
        weights = {n: p.detach().clone() for n, p in session.transformer.named_parameters() if p.requires_grad}
        session.trained_with = session.optimizer
        return session, list(session.losses), weights
    finally:
        session.end()


@pytest.fixture(scope="module")
def plain(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[float], dict]]:
    runs = {}
    for job in ("job.toml", "job_flux1.toml"):
        _, losses, weights = _train(demo_dir, tmp_path_factory.mktemp("plain"), job)
        runs[job] = (losses, weights)
    return runs


def _assert_same(result: tuple[Session, list[float], dict], expected: tuple[list[float], dict]) -> None:
    _, losses, weights = result
    assert losses == pytest.approx(expected[0], abs=1e-6, rel=1e-5)
    assert weights.keys() == expected[1].keys()
    for name, value in expected[1].items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


TECHNIQUES = {
    "checkpointing": ["lowvram.gradient_checkpointing=true"],
    "checkpointing every 2nd block": ["lowvram.gradient_checkpointing=true", "lowvram.checkpointing_interval=2"],
    "checkpoint inputs offloaded": ["lowvram.gradient_checkpointing=true", "lowvram.cpu_offload_checkpointing=true"],
    "one block swapped": ["lowvram.blocks_to_swap=1"],
    "most blocks swapped, prefetch 2": ["lowvram.blocks_to_swap=2", "lowvram.swap_prefetch=2"],
    "optimizer offloaded": ["lowvram.optimizer_offload=true"],
    "fused backward": ["lowvram.fused_backward=true"],
    "fused backward, offloaded steps": ["lowvram.fused_backward=true", "lowvram.optimizer_offload=true"],
}


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_each_technique_trains_like_the_plain_run(demo_dir: Path, tmp_path: Path, plain: dict,
                                                  technique: str) -> None:
    result = _train(demo_dir, tmp_path, "job.toml", *TECHNIQUES[technique])
    _assert_same(result, plain["job.toml"])
    optimizer = result[0].trained_with
    assert isinstance(optimizer, FusedBackward) == ("fused" in technique)
    if "offloaded steps" in technique:
        assert all(isinstance(o, OffloadedOptimizer) for o in optimizer.optimizers)
    elif technique == "optimizer offloaded":
        assert isinstance(optimizer, OffloadedOptimizer)


@pytest.mark.parametrize("job", ["job.toml", "job_flux1.toml"])
@pytest.mark.parametrize("strategy", ["conservative", "aggressive", "extreme"])
def test_each_strategy_trains_like_the_plain_run(demo_dir: Path, tmp_path: Path, plain: dict, job: str,
                                                 strategy: str) -> None:
    result = _train(demo_dir, tmp_path, job, f"lowvram.strategy='{strategy}'")
    _assert_same(result, plain[job])
    assert result[0].plan.strategy == strategy


def test_the_extreme_plan_really_runs_its_techniques(demo_dir: Path, tmp_path: Path) -> None:
    """What `extreme` switched on is what ran: blocks streamed, inputs offloaded, steps fused and on the CPU."""
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [*BASE, f"output.dir='{tmp_path}'",
                                                           "lowvram.strategy='extreme'"]), demo_dir)
    session = Session(spec)
    try:
        session.setup()
        session.train(1)
        assert session.plan.blocks_to_swap == 2  # the demo's 4 blocks, two stay resident
        assert session.swapper is not None and session.swapper.stats.copies > 0
        assert session.offloader is not None and session.offloader.bytes_offloaded > 0
        assert isinstance(session.optimizer, FusedBackward)
        assert all(isinstance(o, OffloadedOptimizer) for o in session.optimizer.optimizers)
    finally:
        session.end()


def test_extreme_run_resumes_exactly(demo_dir: Path, tmp_path: Path) -> None:
    """Fused per-parameter optimisers on CPU copies save and restore their state like the plain optimiser."""
    settings = ["lowvram.strategy='extreme'", "train.max_grad_norm=1.0"]
    _, straight_losses, straight = _train(demo_dir, tmp_path / "straight", "job.toml", *settings)
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [*BASE, f"output.dir='{tmp_path / 'broken'}'",
                                                           *settings]), demo_dir)
    first = Session(spec)
    try:
        first.setup()
        first.train(1)
        first.save(intermediate=True)
    finally:
        first.end()
    resumed = Session(spec, resume=True)
    try:
        resumed.setup()
        resumed.train()
        assert resumed.losses == pytest.approx(straight_losses, abs=1e-6)
        for name, param in resumed.transformer.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.detach(), straight[name], rtol=1e-6, atol=1e-7, msg=name)
    finally:
        resumed.end()


def test_the_gpu_bench_runs_its_plan_on_a_tiny_shape() -> None:
    """bench/bench_lowvram.py's case runner (for a GPU) works end to end on the CPU with the demo's shape."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_lowvram.py"
    module_spec = importlib.util.spec_from_file_location("bench_lowvram", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    row = bench.run_case(bench.TINY, "extreme", 64, steps=1, device_name="cpu")
    assert row["blocks_to_swap"] == 2 and row["swap_gib_per_step"] > 0 and row["s_per_step"] > 0


def test_swapping_a_quantised_base_trains_like_the_unswapped_one(demo_dir: Path, tmp_path: Path) -> None:
    """fp8 weights and their scales stream through the swap slots like any frozen tensor."""
    quantised = ["model.base_precision='fp8'"]
    _, losses, weights = _train(demo_dir, tmp_path / "plain", "job.toml", *quantised)
    session, swapped_losses, swapped = _train(demo_dir, tmp_path / "swap", "job.toml", *quantised,
                                              "lowvram.blocks_to_swap=2")
    assert session.plan.blocks_to_swap == 2
    _assert_same((session, swapped_losses, swapped), (losses, weights))
