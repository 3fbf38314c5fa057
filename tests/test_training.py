"""A short demo run, in process: the trained LoRA loads in diffusers and changes the pipeline's output."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from trainer.events import Progress, RunFinished, SampleSaved
from trainer.runners.base import Commands
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths

STEPS = 12


JOBS = {"flux2": "job.toml", "flux1": "job_flux1.toml"}


def _spec(demo_dir: Path, out: Path, *overrides: str, family: str = "flux2"):  # noqa: ANN202
    base = [f"train.max_steps={STEPS}", "train.learning_rate=0.01", "lora.alpha=2.0", "sample.every_steps=6",
            f"output.dir='{out}'"]
    return resolve_paths(load_spec(demo_dir / JOBS[family], base + list(overrides)), demo_dir)


@pytest.fixture(scope="module", params=sorted(JOBS))
def trained(request: pytest.FixtureRequest, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    out = tmp_path_factory.mktemp("run")
    events: list = []
    session = Session(_spec(demo_dir, out, family=request.param), emit=events.append)
    path = session.run()
    yield session, events, path
    session.end()


def _latents(pipe, text: dict, seed: int = 7) -> torch.Tensor:  # noqa: ANN001
    """Denoised latents for one prompt with fixed noise: the pipeline's own sampling loop."""
    return pipe(**{k: v for k, v in text.items()}, num_inference_steps=3, guidance_scale=1.0, height=64, width=64,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


def test_run_writes_lora_resolved_spec_events_and_samples(trained) -> None:  # noqa: ANN001
    session, events, path = trained
    out = session.output_dir
    assert path == out / "demo_lora.safetensors" and path.is_file()
    assert (out / "job.resolved.toml").is_file()
    assert load_spec(out / "job.resolved.toml") == session.spec_as_run()  # the plan that ran, not "auto"
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "run_started"
    assert lines[-1]["event"] == "run_finished" and lines[-1]["status"] == "completed"
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, STEPS + 1))
    samples = [e for e in events if isinstance(e, SampleSaved)]
    assert sorted({e.step for e in samples}) == [0, 6, 12]  # step 0 is the baseline
    assert all(Path(e.path).is_file() for e in samples)
    assert all(torch.isfinite(torch.tensor(session.losses)))


def test_diffusers_loader_reproduces_the_trained_model(trained, demo_dir: Path) -> None:  # noqa: ANN001
    session, _, path = trained
    text = session.text_cache[session.spec.sample.prompts[0]]
    with torch.no_grad():
        trained_out = _latents(session.pipe, text)
        fresh = type(session.pipe).from_pretrained(demo_dir / session.spec.model.family)
        fresh.set_progress_bar_config(disable=True)
        base = _latents(fresh, text)
        fresh.load_lora_weights(path.parent, weight_name=path.name)
        with_lora = _latents(fresh, text)
        fresh.unload_lora_weights()
        unloaded = _latents(fresh, text)
    assert (with_lora - base).abs().max() > 1e-3, "the LoRA does not change the output"
    torch.testing.assert_close(with_lora, trained_out, rtol=1e-5, atol=1e-5)  # alpha/rank scaling kept
    assert torch.equal(unloaded, base), "unloading the LoRA does not restore the base output exactly"


def test_stop_ends_at_the_next_step_and_saves(demo_dir: Path, tmp_path: Path) -> None:
    commands = Commands()
    events: list = []

    def emit(event) -> None:  # noqa: ANN001
        events.append(event)
        if isinstance(event, Progress) and event.step == 3:
            commands.request_stop()

    session = Session(_spec(demo_dir, tmp_path, "sample.prompts=[]"), emit=emit, commands=commands)
    try:
        path = session.run()
    finally:
        session.end()
    finished = events[-1]
    assert isinstance(finished, RunFinished) and finished.status == "stopped" and finished.step == 3
    assert path.is_file() and finished.lora_path == str(path)


def test_end_releases_the_models(demo_dir: Path, tmp_path: Path) -> None:
    session = Session(_spec(demo_dir, tmp_path, "train.max_steps=1", "sample.prompts=[]"))
    session.run()
    transformer = weakref.ref(session.transformer)
    session.end()
    gc.collect()
    assert transformer() is None, "the transformer is still referenced after end()"
