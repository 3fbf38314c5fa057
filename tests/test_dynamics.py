"""Training dynamics a user tunes: timestep range, guidance, masked loss, prior preservation, sample prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer import flow
from trainer.errors import UserError
from trainer.prompts import sample_prompts
from trainer.session import Session
from trainer.spec import AdvancedSection, load_spec, parse_spec, resolve_paths


def _spec(demo_dir: Path, out: Path, *overrides: str):  # noqa: ANN202
    base = ["train.max_steps=2", "sample.prompts=[]", f"output.dir='{out}'", "output.save_state=false"]
    return resolve_paths(load_spec(demo_dir / "job.toml", base + list(overrides)), demo_dir)


def _loss_of_first_batch(spec) -> float:  # noqa: ANN001
    session = Session(spec)
    try:
        session.setup()
        with torch.no_grad():
            return session._batch_loss(session._next_batch()).item()
    finally:
        session.end()


@pytest.mark.parametrize(("low", "high"), [(0, 1000), (200, 400), (900, 1000)])
def test_sigmas_stay_in_the_timestep_range(low: int, high: int) -> None:
    advanced = AdvancedSection(min_timestep=low, max_timestep=high, timestep_sampling="uniform", shift=3.0,
                               auto_shift=False)
    sigmas = flow.sample_sigmas(advanced, 4096, None, torch.Generator().manual_seed(0))
    assert sigmas.min() >= low / 1000 and sigmas.max() <= high / 1000
    assert sigmas.max() - sigmas.min() > 0.9 * (high - low) / 1000  # the whole range is used


def test_shift_moves_sigmas_towards_noise() -> None:
    u = AdvancedSection(timestep_sampling="uniform", auto_shift=False, shift=1.0)
    s = AdvancedSection(timestep_sampling="uniform", auto_shift=False, shift=3.0)
    plain = flow.sample_sigmas(u, 4096, None, torch.Generator().manual_seed(0))
    shifted = flow.sample_sigmas(s, 4096, None, torch.Generator().manual_seed(0))
    assert shifted.mean() > plain.mean() + 0.1
    assert torch.all(shifted >= plain)


def test_random_guidance_covers_its_range_and_constant_is_constant() -> None:
    random = AdvancedSection(guidance_mode="random", guidance_min=2.0, guidance_max=5.0)
    values = flow.guidance_values(random, 2048, torch.Generator().manual_seed(0))
    assert values.min() >= 2.0 and values.max() <= 5.0 and values.max() - values.min() > 2.5
    constant = flow.guidance_values(AdvancedSection(guidance_value=3.5), 8, torch.Generator())
    assert torch.equal(constant, torch.full((8,), 3.5))


def test_inverted_ranges_are_refused_with_field_names() -> None:
    with pytest.raises(ValueError, match="min_timestep"):
        AdvancedSection(min_timestep=500, max_timestep=400)
    with pytest.raises(ValueError, match="guidance_min"):
        AdvancedSection(guidance_mode="random", guidance_min=5, guidance_max=1)


def _write_masks(demo_dir: Path, folder: Path, value: int) -> Path:
    folder.mkdir()
    for image in sorted((demo_dir / "dataset").glob("*.png")):
        Image.new("L", (64, 64), value).save(folder / image.name)
    return folder


def test_white_masks_change_nothing_and_black_masks_silence_the_loss(demo_dir: Path, tmp_path: Path) -> None:
    white = _write_masks(demo_dir, tmp_path / "white", 255)
    black = _write_masks(demo_dir, tmp_path / "black", 0)
    plain = _loss_of_first_batch(_spec(demo_dir, tmp_path / "o1"))
    with_white = _loss_of_first_batch(_spec(demo_dir, tmp_path / "o2", f"data.datasets[0].masks='{white}'"))
    with_black = _loss_of_first_batch(_spec(demo_dir, tmp_path / "o3", f"data.datasets[0].masks='{black}'"))
    assert with_white == pytest.approx(plain, rel=1e-6)
    assert with_black == 0.0


def _dataset_override(demo_dir: Path, extra: str) -> str:
    folder = demo_dir / "dataset"
    return f"data.datasets=[{{path='{folder}', trigger='shapez'}}, {{path='{folder}'{extra}}}]"


def test_mask_folder_missing_a_mask_is_named(demo_dir: Path, tmp_path: Path) -> None:
    masks = _write_masks(demo_dir, tmp_path / "masks", 255)
    (masks / "shape_03.png").unlink()
    with pytest.raises(UserError, match=r"data.datasets\[0\].masks: no mask with the same name for shape_03.png"):
        Session(_spec(demo_dir, tmp_path / "o", f"data.datasets[0].masks='{masks}'")).setup()


def test_prior_loss_weight_scales_regularisation_items(demo_dir: Path, tmp_path: Path) -> None:
    def reg_only_loss(weight: float) -> float:
        spec = _spec(demo_dir, tmp_path / f"o{weight}", f"data.prior_loss_weight={weight}",
                     _dataset_override(demo_dir, ", is_regularisation=true"))
        session = Session(spec)
        try:
            session.setup()
            reg = [i for i, item in enumerate(session.items) if item.is_regularisation][:2]
            session.generator.manual_seed(0)
            with torch.no_grad():
                return session._batch_loss(reg).item()
        finally:
            session.end()

    assert reg_only_loss(0.0) == 0.0
    assert reg_only_loss(2.0) == pytest.approx(2 * reg_only_loss(1.0), rel=1e-6)


def test_only_regularisation_data_is_refused(demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="is_regularisation"):
        parse_spec({"model": {"source": "x"}, "data": {"datasets": [{"path": "a", "is_regularisation": True}]}})


def test_prompt_library_nicknames_and_token(demo_dir: Path, tmp_path: Path) -> None:
    library = tmp_path / "prompts.toml"
    library.write_text('portrait = "a photo of <token>, studio light"\nwide = "<token> in a field"\n')
    spec = _spec(demo_dir, tmp_path / "o", f"sample.prompt_library='{library}'",
                 'sample.prompts=["@portrait", "a drawing of <token>"]')
    prompts = sample_prompts(spec)
    assert [(p.name, p.text) for p in prompts] == [("portrait", "a photo of shapez, studio light"),
                                                   ("1", "a drawing of shapez")]
    with pytest.raises(UserError, match=r"sample.prompts\[0\]: '@nope' is not in the prompt library"):
        sample_prompts(_spec(demo_dir, tmp_path / "o", f"sample.prompt_library='{library}'",
                             'sample.prompts=["@nope"]'))


def test_samples_are_named_by_step_and_nickname(demo_dir: Path, tmp_path: Path) -> None:
    library = tmp_path / "prompts.toml"
    library.write_text('portrait = "a photo of <token>"\n')
    spec = _spec(demo_dir, tmp_path / "o", f"sample.prompt_library='{library}'", 'sample.prompts=["@portrait"]',
                 "sample.every_steps=2")
    session = Session(spec)
    try:
        session.run()
    finally:
        session.end()
    assert sorted(p.name for p in (tmp_path / "o" / "samples").iterdir()) == [
        "step000000_portrait.png", "step000002_portrait.png"]


def test_loss_weighting_schemes() -> None:
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(flow.loss_weights(AdvancedSection(loss_weighting="none"), sigmas), torch.ones(3))
    sqrt = flow.loss_weights(AdvancedSection(loss_weighting="sigma_sqrt"), sigmas)
    torch.testing.assert_close(sqrt, sigmas ** -2.0)
    cosmap = flow.loss_weights(AdvancedSection(loss_weighting="cosmap"), sigmas)
    assert cosmap[1] > cosmap[0] and cosmap[1] > cosmap[2]  # peaks at mid noise


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_adapter_weights(demo_dir: Path, tmp_path: Path, precision: str) -> None:
    session = Session(_spec(demo_dir, tmp_path, f"train.mixed_precision='{precision}'", "train.learning_rate=0.01"))
    try:
        session.run()
        params = session.trainable_parameters()
        assert params and all(p.dtype == torch.float32 for p in params)
        assert all(torch.isfinite(torch.tensor(session.losses)))
        assert any(p.abs().sum() > 0 for p in params if p.dim() == 2)
    finally:
        session.end()
