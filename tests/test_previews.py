"""sample.preview_every / sample.preview_decoder: while a sample renders, the image so far appears every N denoising
steps (a small JPEG in samples/previews/ and a SamplePreview event), decoded by the VAE on a downscaled latent or by
a tiny autoencoder; the final sample replaces it, unchanged bit for bit, and the Run tab shows the latest one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import previews
from trainer.demo import sample_prompts
from trainer.events import (
    Event,
    PhaseChanged,
    Progress,
    RunStarted,
    SamplePreview,
    SampleSaved,
)
from trainer.preflight import check_files
from trainer.session import Session
from trainer.spec import SpecError, load_spec, parse_spec, resolve_paths
from ui.preview_state import preview_label
from ui.previews import live_preview, preview_image
from ui.run_state import RunView

JOBS = {"flux2": "job.toml", "flux1": "job_flux1.toml"}


def _run(demo_dir: Path, out: Path, family: str, *sets: str) -> tuple[list[Event], list[tuple[Path, bool, tuple]]]:
    """One training step and the final samples of two of the job's prompts; returns the events and, per preview,
    (path, whether the file was there when announced, its size)."""
    spec = resolve_paths(load_spec(demo_dir / JOBS[family], [
        "train.max_steps=1", "sample.every_steps=0", "output.save_state=false", f"output.dir='{out}'",
        "output.log_with=[]", f"sample.prompts={sample_prompts()[:2]!r}", *sets]), demo_dir)
    assert check_files(spec) == []
    events: list[Event] = []
    seen: list[tuple[Path, bool, tuple]] = []

    def emit(event: Event) -> None:
        events.append(event)
        if isinstance(event, SamplePreview):
            path = Path(event.path)
            size = Image.open(path).size if path.is_file() else ()
            seen.append((path, path.is_file(), size))

    session = Session(spec, emit=emit)
    try:
        session.run()
    finally:
        session.end()
    return events, seen


def test_previews_come_at_their_steps_go_with_the_final_sample_and_leave_it_bit_identical(
        demo_dir: Path, tmp_path: Path) -> None:
    events, seen = _run(demo_dir, tmp_path / "on", "flux2", "sample.steps=5", "sample.preview_every=2")
    shown = [e for e in events if isinstance(e, SamplePreview)]
    # every 2nd of 5 steps, never the last (the final sample is that one), for each of the two prompts in turn
    assert [(e.index, e.count, e.denoise_step, e.denoise_steps, e.step) for e in shown] == [
        (1, 2, 2, 5, 1), (1, 2, 4, 5, 1), (2, 2, 2, 5, 1), (2, 2, 4, 5, 1)]
    # written before announced; decoded from a latent of half the size: a quarter of the final decode
    assert all(there and size == (32, 32) for _, there, size in seen)
    assert all(path.parent == tmp_path / "on" / "samples" / "previews" and path.suffix == ".jpg"
               for path, _, _ in seen)
    kinds = [type(e).__name__ for e in events if isinstance(e, (SamplePreview, SampleSaved))]
    assert kinds == ["SamplePreview"] * 2 + ["SampleSaved"] + ["SamplePreview"] * 2 + ["SampleSaved"]
    assert not (tmp_path / "on" / "samples" / "previews").exists()  # the final samples replaced them
    logged = [json.loads(line) for line in (tmp_path / "on" / "events.jsonl").read_text().splitlines()]
    assert [e["denoise_step"] for e in logged if e["event"] == "sample_preview"] == [2, 4, 2, 4]  # CLI, app, launch
    _, none = _run(demo_dir, tmp_path / "off", "flux2", "sample.steps=5", "sample.preview_every=0")
    assert none == []
    samples = sorted(p.name for p in (tmp_path / "on" / "samples").iterdir())
    assert samples == sorted(p.name for p in (tmp_path / "off" / "samples").iterdir()) and len(samples) == 2
    for name in samples:
        assert (tmp_path / "on" / "samples" / name).read_bytes() == (tmp_path / "off" / "samples" / name).read_bytes()


def _tiny_decoder(folder: Path, latent_channels: int) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8, 8, 8, 8),
                    decoder_block_out_channels=(8, 8, 8, 8)).save_pretrained(folder)
    return folder


def test_a_tiny_autoencoder_decodes_the_previews_when_one_is_configured(
        demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderTiny

    tiny = _tiny_decoder(tmp_path / "tiny16", 16)
    decoded: list[tuple] = []
    real = AutoencoderTiny.decode

    def counted(self, latents, *args, **kwargs):  # noqa: ANN001, ANN202
        decoded.append(tuple(latents.shape))
        return real(self, latents, *args, **kwargs)

    monkeypatch.setattr(AutoencoderTiny, "decode", counted)
    events, seen = _run(demo_dir, tmp_path / "out", "flux1", "sample.steps=3", "sample.preview_every=1",
                        f"sample.preview_decoder='{tiny}'")
    assert [(e.index, e.denoise_step) for e in events if isinstance(e, SamplePreview)] == [(1, 2), (2, 2)]
    assert decoded == [(1, 16, 4, 4)] * 2 and all(size == (32, 32) for _, _, size in seen)
    # a tiny autoencoder of the other family's latents is refused before anything loads, naming the setting
    wrong = _tiny_decoder(tmp_path / "tiny32", 32)
    spec = resolve_paths(load_spec(demo_dir / JOBS["flux1"], [f"sample.preview_decoder='{wrong}'"]), demo_dir)
    problems = check_files(spec)
    assert len(problems) == 1 and problems[0].startswith("sample.preview_decoder:") and "16" in problems[0]


@pytest.mark.parametrize("family", list(JOBS))
def test_the_sampler_latents_decode_as_the_pipeline_decodes_them(demo_dir: Path, family: str) -> None:
    """decoder_latents at the last step, decoded, is the pipeline's own image (within one level of rounding): the
    previews show what the sample becomes."""
    from trainer.families import family_ops
    from trainer.registry import get_flavour

    ops = family_ops(family)
    pipe = ops.load_pipeline(str(demo_dir / family), get_flavour(family, "demo"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    text = {"prompt_embeds": torch.randn(1, 8, config.joint_attention_dim, generator=generator)}
    if family == "flux1":
        text["pooled_prompt_embeds"] = torch.randn(1, config.pooled_projection_dim, generator=generator)
    last: dict[str, torch.Tensor] = {}

    def keep(pipe, i, t, tensors):  # noqa: ANN001, ANN202
        last["latents"] = tensors["latents"].clone()
        return {}

    image = ops.sample(pipe, text, None, 3, 1.0, 7, 64, None, keep)
    with torch.no_grad():
        latents = ops.decoder_latents(pipe, last["latents"], 64, 64, pipe.vae)
        ours = previews.to_image(pipe.vae.decode(latents, return_dict=False)[0])
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(image, dtype=np.int16))
    assert ours.size == image.size and difference.max() <= 1


def test_the_denoised_estimate_undoes_one_euler_step_and_previews_are_small() -> None:
    clean, noise = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    velocity = noise - clean  # flow matching: x_sigma = (1 - sigma) clean + sigma noise
    before, after = (1 - 0.8) * clean + 0.8 * noise, (1 - 0.6) * clean + 0.6 * noise
    assert torch.allclose(after, before + (0.6 - 0.8) * velocity, atol=1e-6)
    assert torch.allclose(previews.denoised_estimate(before, after, 0.8, 0.6), clean, atol=1e-5)
    assert previews.preview_steps(5, 28) == [5, 10, 15, 20, 25] and previews.preview_steps(1, 4) == [2, 3]
    assert previews.preview_steps(0, 28) == [] and previews.preview_steps(5, 5) == []
    shape = lambda side: tuple(previews.downscaled(torch.zeros(1, 32, side // 8, side // 8), 8, 512).shape[-2:])  # noqa: E731
    assert shape(1024) == (64, 64) and shape(2048) == (64, 64) and shape(512) == (32, 32)  # <= 512 px, <= half


def test_the_run_tab_shows_the_latest_preview_until_the_sample_lands(tmp_path: Path) -> None:
    view = RunView()
    view.begin(4)
    view.apply([RunStarted(max_steps=4, output_dir=str(tmp_path), family="flux2", flavour="demo"),
                PhaseChanged(phase="sampling", detail="2 prompts at step 2")])
    assert live_preview(view) is None
    for step, colour in ((5, (255, 0, 0)), (10, (0, 0, 255))):
        path = tmp_path / f"step000002_0_{step:03d}.jpg"
        Image.new("RGB", (16, 16), colour).save(path)
        view.apply([SamplePreview(step=2, index=1, count=2, prompt="a red circle", path=str(path),
                                  denoise_step=step, denoise_steps=28)])
    preview = live_preview(view)
    assert preview.path.endswith("_010.jpg") and preview_image(preview).getpixel((8, 8))[2] > 200  # latest: blue
    # the pages learn of it from the published state (its key), not from a timer of their own
    assert view.snapshot().preview == preview.path
    assert preview_label(preview) == "sample 1/2 at step 2, denoising step 10/28: a red circle"
    Path(preview.path).unlink()  # the trainer deletes it once the final sample is written; the page copes
    assert preview_image(preview) is None
    view.apply([SampleSaved(step=2, path=str(tmp_path / "step000002_0.png"), prompt="a red circle")])
    assert live_preview(view) is None and view.snapshot().preview == ""
    view.apply([SamplePreview(step=2, index=2, count=2, prompt="b", path=str(tmp_path / "x.jpg"), denoise_step=5,
                              denoise_steps=28), Progress(step=3, max_steps=4, loss=0.1, learning_rate=1e-4,
                                                          steps_per_second=1.0, eta_seconds=1.0)])
    assert view.preview is None  # training went on: nothing renders


def test_preview_settings_validate_reach_the_form_and_count_in_the_estimate(tmp_path: Path) -> None:
    from trainer.estimator.core import TINY_DECODER_PARAMS, estimate
    from trainer.memory.strategies import bundle_plan
    from ui import form

    with pytest.raises(SpecError) as caught:
        parse_spec({"sample": {"preview_every": -1}})
    assert any(p.startswith("sample.preview_every") for p in caught.value.problems)
    values = form.spec_to_values(parse_spec(form.default_job(tmp_path)))
    assert values["sample.preview_every"] == 5 and values["sample.preview_decoder"] == ""
    spec = form.form_to_spec(dict(values, **{"sample.preview_every": 2, "sample.preview_decoder": "madebyollin/taef1"}))
    assert (spec.sample.preview_every, spec.sample.preview_decoder) == (2, "madebyollin/taef1")
    job = {"model": {"family": "flux1", "flavour": "dev", "source": "x"}, "sample": {"prompts": ["a"]},
           "lowvram": {"strategy": "none"}}
    plain = parse_spec(job)
    tiny = parse_spec({**job, "sample": {"prompts": ["a"], "preview_decoder": "madebyollin/taef1"}})
    before = estimate(plain, bundle_plan(plain, "none")).phases["validation sampling"]
    after = estimate(tiny, bundle_plan(tiny, "none")).phases["validation sampling"]
    assert after.parts["preview decoder (tiny autoencoder)"] == pytest.approx(TINY_DECODER_PARAMS * 2 / 2**30)
    assert after.vram_gib == pytest.approx(before.vram_gib + TINY_DECODER_PARAMS * 2 / 2**30)
