"""train.ema_decay: an EMA of the LoRA saved beside it, sampled from when asked, resumed exactly, estimated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import saved_states
from trainer.ema import LoraEma
from trainer.events import Progress
from trainer.runners.base import Commands
from trainer.session import Session
from trainer.spec import SpecError, load_spec, parse_spec, resolve_paths

STEPS = 6
SETTINGS = [f"train.max_steps={STEPS}", "output.save_every_steps=3", "sample.prompts=[]", "lora.dropout=0.1",
            "train.ema_decay=0.8", "output.formats=['diffusers', 'comfyui']"]


def _spec(demo_dir: Path, out: Path, *extra: str):  # noqa: ANN202
    return resolve_paths(load_spec(demo_dir / "job.toml", [*SETTINGS, f"output.dir='{out}'", *extra]), demo_dir)


def _run(spec, resume: bool = False, stop_at: int | None = None) -> Session:  # noqa: ANN001
    commands = Commands()

    def emit(event) -> None:  # noqa: ANN001
        if isinstance(event, Progress) and event.step == stop_at:
            commands.request_stop()

    session = Session(spec, emit=emit, commands=commands, resume=resume)
    try:
        session.run()
    finally:
        session.end()
    return session


def _files(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    names = ("demo_lora.safetensors", "demo_lora_ema.safetensors", "demo_lora_ema_comfyui.safetensors")
    return {name: load_file(out / name) for name in names}


def test_stop_then_resume_equals_the_unbroken_run_ema_included(demo_dir: Path, tmp_path: Path) -> None:
    straight = _files(_run(_spec(demo_dir, tmp_path / "straight")).output_dir)
    assert (tmp_path / "straight" / "demo_lora_ema-step000003.safetensors").is_file()  # interval saves too
    lora, ema = straight["demo_lora.safetensors"], straight["demo_lora_ema.safetensors"]
    assert lora.keys() == ema.keys()
    assert any(not torch.equal(lora[k], ema[k]) for k in lora)  # the average lags the trained weights
    out = tmp_path / "broken"
    assert _run(_spec(demo_dir, out), stop_at=2).step == 2
    assert [step for step, _ in saved_states(out)] == [2]
    _run(_spec(demo_dir, out), resume=True)
    again = _files(out)
    for name, tensors in straight.items():
        assert again[name].keys() == tensors.keys()
        for key in tensors:
            torch.testing.assert_close(again[name][key], tensors[key], rtol=0, atol=1e-6)


def test_samples_use_the_ema_when_asked_and_training_weights_come_back(demo_dir: Path, tmp_path: Path) -> None:
    spec = _spec(demo_dir, tmp_path, "train.max_steps=3", "sample.prompts=['shapez a circle']", "sample.steps=2",
                 "train.ema_device='cpu'", "output.save_state=false")
    session = Session(spec)
    try:
        session.setup()
        session.train()
        trained = {k: v.detach().clone() for k, v in session.lora_parameters().items()}
        assert all(t.device.type == "cpu" for t in session.ema.shadow.values())
        plain = session.validate()[0].read_bytes()
        session.spec = spec.model_copy(update={"sample": spec.sample.model_copy(update={"use_ema": True})})
        averaged = session.validate()[0].read_bytes()
        assert plain != averaged
        for name, param in session.lora_parameters().items():
            assert torch.equal(param, trained[name])
    finally:
        session.end()


def test_update_is_the_exponential_average() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEma({"w": weight}, decay=0.9, device=torch.device("cpu"))
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update({"w": weight})
    ema.update({"w": weight})
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 1 - 0.9**2))


def test_settings_that_need_an_ema_are_refused(demo_dir: Path) -> None:
    with pytest.raises(SpecError, match=r"sample\.use_ema: there is no EMA"):
        load_spec(demo_dir / "job.toml", ["sample.use_ema=true"])
    with pytest.raises(SpecError, match=r"train\.ema_device: applies to the EMA only"):
        load_spec(demo_dir / "job.toml", ["train.ema_device='cpu'"])
    with pytest.raises(SpecError, match=r"train\.ema_decay"):
        load_spec(demo_dir / "job.toml", ["train.ema_decay=1.0"])


def test_estimator_counts_the_ema_where_it_is_kept() -> None:
    from trainer.estimator.job import estimate_job

    def job(**train: object):  # noqa: ANN202
        return parse_spec({"model": {"family": "flux2", "flavour": "klein-base-9b"}, "train": train,
                           "lowvram": {"strategy": "conservative"}})

    def part(result, name: str, ram: bool = False) -> float:  # noqa: ANN001
        parts = result.ram_breakdown if ram else result.phases["training step"].parts
        return sum(v for k, v in parts.items() if k.startswith(name))

    base, gpu, cpu = (estimate_job(job(**t)) for t in ({}, {"ema_decay": 0.999},
                                                        {"ema_decay": 0.999, "ema_device": "cpu"}))
    lora = part(base, "lora weights")
    assert part(gpu, "lora EMA") == pytest.approx(lora)
    assert gpu.phases["training step"].vram_gib > base.phases["training step"].vram_gib
    assert cpu.phases["training step"].vram_gib == pytest.approx(base.phases["training step"].vram_gib)
    assert cpu.phases["training step"].ram_gib - base.phases["training step"].ram_gib == pytest.approx(lora)
    assert part(cpu, "lora EMA", ram=True) == pytest.approx(lora) and part(gpu, "lora EMA", ram=True) == 0
