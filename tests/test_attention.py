"""advanced.attention: refused with the reason where it cannot run; training and sampling use the chosen kernel."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from trainer import attention
from trainer.estimator.job import estimate_job
from trainer.events import PhaseChanged
from trainer.preflight import check_files
from trainer.session import Session
from trainer.spec import load_spec, parse_spec, resolve_paths


def _spec(demo_dir: Path, out: Path, *extra: str):  # noqa: ANN202
    return resolve_paths(load_spec(demo_dir / "job.toml", [
        "train.max_steps=2", "sample.prompts=['shapez a circle']", "sample.steps=1", "sample.every_steps=0",
        "output.save_state=false", f"output.dir='{out}'", *extra]), demo_dir)


@pytest.mark.parametrize(("backend", "package"), [("flash", "flash-attn"), ("sage", "sageattention"),
                                                  ("xformers", "xformers")])
def test_validate_names_the_missing_package(demo_dir: Path, tmp_path: Path, backend: str, package: str) -> None:
    if importlib.util.find_spec(attention._PACKAGES[backend][0]) is not None:
        pytest.skip(f"{package} is installed here; this checks the refusal without it")
    problems = check_files(_spec(demo_dir, tmp_path, f"advanced.attention='{backend}'"))
    assert any(p.startswith(f"advanced.attention: '{backend}' needs the {package} package") for p in problems)


def test_gpu_and_precision_requirements(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # as if every package were installed
    flash = _spec(demo_dir, tmp_path, "advanced.attention='flash'")  # the demo computes in fp32
    assert "runs on a CUDA GPU only" in attention.attention_problems(flash, None)[0]
    assert "compute capability 8.0 or newer; this one is 7.5" in attention.attention_problems(flash, (7, 5))[0]
    assert "computes in bf16/fp16 only" in attention.attention_problems(flash, (9, 0))[0]
    bf16 = _spec(demo_dir, tmp_path, "advanced.attention='flash'", "train.mixed_precision='bf16'")
    assert attention.attention_problems(bf16, (9, 0)) == []
    xformers = _spec(demo_dir, tmp_path, "advanced.attention='xformers'")  # any precision
    assert attention.attention_problems(xformers, (8, 6)) == []


def _calls_by_phase(demo_dir: Path, out: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Run the demo with `backend` routed to diffusers' math kernel; count its calls in each phase."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    monkeypatch.setattr("trainer.preflight.check_attention", lambda spec: [])  # no GPU here: the kernel is a stand-in
    monkeypatch.setitem(attention.DISPATCHER_NAMES, backend, "_native_math")
    math_kernel = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    phase, calls = ["setup"], Counter()

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[phase[0]] += 1
        return math_kernel(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, counted)
    session = Session(_spec(demo_dir, out, f"advanced.attention='{backend}'"),
                      emit=lambda e: phase.__setitem__(0, e.phase) if isinstance(e, PhaseChanged) else None)
    try:
        session.run()
    finally:
        session.end()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    return calls


def test_training_and_sampling_run_the_chosen_kernel(demo_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls_by_phase(demo_dir, tmp_path, "xformers", monkeypatch)
    assert calls["training"] > 0 and calls["sampling"] > 0


def test_sage_samples_but_training_keeps_sdpa(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls_by_phase(demo_dir, tmp_path, "sage", monkeypatch)
    assert calls["training"] == 0 and calls["sampling"] > 0


def test_estimator_knows_each_kernels_working_memory() -> None:
    def step(attention_name: str, fused: bool = True) -> dict[str, float]:
        spec = parse_spec({"model": {"family": "flux2", "flavour": "klein-base-9b"}, "sample": {"prompts": ["a"]},
                           "lowvram": {"strategy": "none"}, "advanced": {"attention": attention_name}})
        result = estimate_job(spec, fused_attention=fused)
        return {"train": result.phases["training step"].parts["attention workspace"],
                "sample": result.phases["validation sampling"].vram_gib}

    sdpa, math, flash, xformers, sage = (step("sdpa"), step("sdpa", fused=False), step("flash"), step("xformers"),
                                         step("sage"))
    assert sdpa["train"] == 0 < flash["train"] == xformers["train"] < math["train"] / 1000  # lse vs s²
    assert sage["train"] == sdpa["train"] and sage["sample"] > sdpa["sample"]
