"""train.compile: every block compiled gives the eager run's LoRA, with block swap, checkpointing and a quantised
base; a platform that cannot compile trains eager with one message.

The tests compile with the aot_eager backend (dynamo + AOTAutograd, the parts that meet the hooks of block swap and
checkpointing) because inductor's C++ build takes minutes on this machine; inductor itself against eager is
measured by bench/bench_compile.py (and matched the eager LoRA to 2e-6 on the demo).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_demo_session
from trainer import compiled_blocks
from trainer.session import Session

LOW_VRAM = ["lowvram.blocks_to_swap=1", "lowvram.gradient_checkpointing=true", "model.base_precision='int8'"]


def _run(demo_dir: Path, out: Path, *extra: str) -> tuple[dict[str, torch.Tensor], list[str], Session]:
    try:
        session, messages = run_demo_session(demo_dir, ["train.max_steps=3", f"output.dir='{out}'", *LOW_VRAM, *extra])
    finally:
        torch._dynamo.reset()
    return load_file(out / "demo_lora.safetensors"), messages, session


@pytest.fixture(scope="module")
def eager(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _run(demo_dir, tmp_path_factory.mktemp("eager"))[0]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_compiled_blocks_train_the_eager_lora(demo_dir: Path, tmp_path: Path, eager, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(compiled_blocks, "BACKEND", "aot_eager")
    weights, messages, session = _run(demo_dir, tmp_path, "train.compile=true")
    assert any("blocks compiled with torch.compile" in m for m in messages)
    assert session.compiled is not None and session.compiled.active  # it never fell back
    _assert_close(weights, eager)


def _failing_backend(graph, example_inputs):  # noqa: ANN001, ANN202
    raise RuntimeError("no C++ compiler found")  # what a Windows machine without build tools reports


def test_a_compiler_that_fails_trains_eager_with_one_message(demo_dir: Path, tmp_path: Path, eager,  # noqa: ANN001
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled_blocks, "BACKEND", _failing_backend)
    weights, messages, session = _run(demo_dir, tmp_path, "train.compile=true")
    warned = [m for m in messages if m.startswith("train.compile:")]
    assert len(warned) == 1 and "no C++ compiler found" in warned[0] and "training runs eager" in warned[0]
    assert session.compiled is None
    _assert_close(weights, eager)


def test_a_block_that_fails_to_compile_mid_run_falls_back_and_retries_the_step(
        demo_dir: Path, tmp_path: Path, eager, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(compiled_blocks, "compiler_problem", lambda device: "")  # the probe passes, the blocks fail
    monkeypatch.setattr("trainer.session.compiler_problem", lambda device: "")
    monkeypatch.setattr(compiled_blocks, "BACKEND", _failing_backend)
    weights, messages, session = _run(demo_dir, tmp_path, "train.compile=true")
    assert any("compiling the blocks failed" in m and "goes on eager" in m for m in messages)
    assert session.compiled is not None and not session.compiled.active
    _assert_close(weights, eager)
