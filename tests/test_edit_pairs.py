"""Edit pairs (a reference image beside each target): matching, health, refusal, the packing the pipelines use,
training and caching on the demo."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.flavour_models import as_kontext_folder, demo_shaped_flavour
from tests.test_dataset_run import _run
from trainer.data.health import check_datasets
from trainer.data.images import load_pixels
from trainer.data.pairs import reference_for_sampling, sample_references
from trainer.data.planning import plan_training_items
from trainer.errors import UserError
from trainer.events import LogMessage
from trainer.families import flux1, flux2
from trainer.spec import SpecError, load_spec, parse_spec, resolve_paths


def _pairs(targets: Path, references: Path, target_size: tuple[int, int], reference_size: tuple[int, int],
           count: int, start: int = 0) -> None:
    targets.mkdir(exist_ok=True)
    references.mkdir(exist_ok=True)
    for index in range(start, start + count):
        Image.new("RGB", target_size, (30 * index % 255, 200, 90)).save(targets / f"img_{index:02d}.png")
        (targets / f"img_{index:02d}.txt").write_text(f"make picture {index} green")
        Image.new("RGB", reference_size, (30 * index % 255, 60, 90)).save(references / f"img_{index:02d}.png")


def _spec(demo_dir: Path, out: Path, *overrides: str, job: str = "job_edit.toml"):  # noqa: ANN202
    base = ["train.max_steps=2", "sample.prompts=[]", f"output.dir='{out}'", "output.save_state=false"]
    return resolve_paths(load_spec(demo_dir / job, base + list(overrides)), demo_dir)


def _folders(tmp_path: Path, match: str) -> list[str]:
    return [f"data.datasets[0].path='{tmp_path / 'targets'}'", f"data.datasets[0].conditioning='{tmp_path / 'refs'}'",
            f"data.datasets[0].conditioning_match='{match}'", "data.resolution=128", "data.bucket_step=16"]


# ---------------------------------------------------------------------- matching and health (no model)


def test_strict_takes_the_targets_bucket_loose_its_own_at_the_same_area(demo_dir: Path, tmp_path: Path) -> None:
    _pairs(tmp_path / "targets", tmp_path / "refs", (96, 160), (160, 96), 2)  # portrait targets, landscape refs
    for match in ("strict", "loose"):
        spec = _spec(demo_dir, tmp_path / "out", *_folders(tmp_path, match))
        health = check_datasets(spec)
        items, plan = plan_training_items(spec, health)
        assert {item.bucket for item in items} == {(96, 160)}
        assert all(item.reference_path == tmp_path / "refs" / item.image_path.name for item in items)
        if match == "strict":
            assert {item.reference_bucket for item in items} == {(96, 160)}
            stretched = [row for row in health.rows if row.kind == "pair"]  # one row for the dataset
            assert len(stretched) == 1 and stretched[0].file == tmp_path / "targets"
            assert stretched[0].problem.startswith("2 strict pairs whose reference has another shape: img_00.png "
                                                   "(96x160 <- 160x96), img_01.png (96x160 <- 160x96); strict "
                                                   "matching stretches")
            assert health.verdict == "warnings"
            assert "strict: each reference takes its target's bucket and crop" in plan.report()
        else:
            assert {item.reference_bucket for item in items} == {(160, 96)}  # own aspect, same area as 96x160
            assert health.verdict == "ok"
            assert "target 96x160 <- reference 160x96: 2" in plan.report()


def test_a_target_without_its_reference_and_a_reference_without_its_target_are_reported(demo_dir: Path,
                                                                                       tmp_path: Path) -> None:
    _pairs(tmp_path / "targets", tmp_path / "refs", (64, 64), (64, 64), 8)
    for name in ("img_01", "img_04", "img_05", "img_06", "img_07"):
        (tmp_path / "refs" / f"{name}.png").unlink()
    Image.new("RGB", (64, 64)).save(tmp_path / "refs" / "stray.png")
    (tmp_path / "refs" / "img_02.png").write_bytes(b"not a png")
    spec = _spec(demo_dir, tmp_path / "out", *_folders(tmp_path, "strict"), "data.resolution=64")
    health = check_datasets(spec)
    assert health.verdict == "warnings"
    lines = [" ".join(line.split()) for line in health.table().splitlines()]  # columns padded: spaces squeezed
    # one line per dataset for what many files share: the folder, how many, the first few names
    assert [line for line in lines if "without a reference" in line] == [
        "warning targets/ 5 targets without a reference image of the same name in refs/: img_01.png, "
        "img_04.png, img_05.png and 2 more (a target trains only with its reference); skipped"]
    assert [line for line in lines if "no target" in line] == [
        "warning refs/ 1 reference with no target of the same name in targets/: stray.png; ignored"]
    assert any("targets/img_02.png" in line and "its reference refs/img_02.png: cannot read" in line
               for line in lines)
    assert {p.name for p in health.skipped} == {"img_01.png", "img_02.png", "img_04.png", "img_05.png",
                                                "img_06.png", "img_07.png"}
    items, _ = plan_training_items(spec, health)
    assert sorted(item.image_path.name for item in items) == ["img_00.png", "img_03.png"]

    for name in ("img_00.png", "img_03.png"):
        (tmp_path / "refs" / name).unlink()
    assert check_datasets(spec).verdict == "will not train"  # not one pair left
    for path in (tmp_path / "refs").iterdir():
        path.unlink()
    empty = check_datasets(spec)
    assert empty.verdict == "will not train"
    assert [(row.file, row.severity) for row in empty.rows if row.problem.startswith("no reference images in the "
                                                                                     "reference folder")] == [
        (tmp_path / "refs", "error")]
    assert [row.key for row in empty.rows if row.file == tmp_path / "refs"] == ["data.datasets[0].conditioning"]


def test_preflight_names_a_missing_empty_or_self_conditioning_folder_and_missing_sample_references(
        demo_dir: Path, tmp_path: Path) -> None:
    from trainer.preflight import check_files

    def problems(*overrides: str) -> list[str]:
        return [p for p in check_files(_spec(demo_dir, tmp_path / "out", *overrides))
                if p.startswith(("data.datasets[0].conditioning", "sample.reference_images"))]

    assert problems() == []  # the demo's pairs
    field = "data.datasets[0].conditioning"
    assert problems(f"{field}='{tmp_path / 'nowhere'}'") == [
        f"{field}: folder '{tmp_path / 'nowhere'}' does not exist; give the folder of reference (before) images named "
        f"like the targets in '{demo_dir / 'dataset_edit'}', or remove the key"]
    (tmp_path / "empty").mkdir()
    assert problems(f"{field}='{tmp_path / 'empty'}'")[0].startswith(f"{field}: no images (.jpg")
    assert "is the dataset folder itself" in problems(f"{field}='{demo_dir / 'dataset_edit'}'")[0]
    (tmp_path / "notes.txt").write_text("x")
    os.mkfifo(tmp_path / "pipe.png")  # a pipe where an image belongs: named as such, never opened
    assert problems("sample.prompts=['a', 'b', 'c']", f"sample.reference_images=['{tmp_path / 'gone.png'}', "
                    f"'{tmp_path / 'notes.txt'}', '{tmp_path / 'pipe.png'}']") == [
        f"sample.reference_images[0]: '{tmp_path / 'gone.png'}' does not exist; give an image file",
        "sample.reference_images[1]: 'notes.txt' is not an image the trainer reads (.jpg, .jpeg, .png, .webp, .bmp)",
        f"sample.reference_images[2]: '{tmp_path / 'pipe.png'}' is not a regular file (a pipe, socket or device); "
        "give an image file"]


def test_kontext_without_any_pair_is_warned_about(demo_dir: Path, tmp_path: Path) -> None:
    kontext = ("model.flavour='kontext'", "model.source='flux1'")
    plain = check_datasets(_spec(demo_dir, tmp_path / "out", *kontext, job="job_flux1.toml"))
    assert plain.verdict == "warnings" and [row.problem for row in plain.rows] == [
        "FLUX.1 Kontext [dev] edits a reference image, but no dataset has a conditioning folder: it trains on the "
        "targets alone (text to image); give the folder of reference images if it should learn an edit"]
    pairs = check_datasets(_spec(demo_dir, tmp_path / "out", "model.family='flux1'", *kontext))
    assert pairs.verdict == "ok"
    assert check_datasets(_spec(demo_dir, tmp_path / "out", job="job_flux1.toml")).verdict == "ok"  # FLUX.1 dev


def test_conditioning_is_refused_for_a_flavour_without_reference_images() -> None:
    entry = {"path": "targets", "conditioning": "refs"}
    with pytest.raises(SpecError) as caught:
        parse_spec({"model": {"family": "flux1", "flavour": "dev"}, "data": {"datasets": [entry]}})
    assert "data.datasets[0].conditioning: FLUX.1 [dev] (flux1 dev) takes no reference image" in str(caught.value)
    for family, flavour in (("flux1", "kontext"), ("flux2", "klein-base-4b"), ("flux2", "dev")):
        parse_spec({"model": {"family": family, "flavour": flavour}, "data": {"datasets": [entry]}})


def test_sample_references_one_for_all_one_each_or_the_first_pair(demo_dir: Path, tmp_path: Path) -> None:
    spec = _spec(demo_dir, tmp_path / "out", "sample.prompts=['a', 'b']")
    items, _ = plan_training_items(spec, check_datasets(spec))
    first = demo_dir / "dataset_edit_ref" / "edit_00.png"
    assert sample_references(spec, items, 2) == [first, first]
    other = demo_dir / "dataset_edit_ref" / "edit_03.png"
    both = _spec(demo_dir, tmp_path / "out", "sample.prompts=['a', 'b']", f"sample.reference_images=['{first}', "
                 f"'{other}']")
    assert sample_references(both, items, 2) == [first, other]
    missing = _spec(demo_dir, tmp_path / "out", "sample.prompts=['a']", "sample.reference_images=['nope.png']")
    with pytest.raises(UserError, match=r"sample.reference_images\[0\]: '.*nope.png' does not exist; give an image"):
        sample_references(missing, items, 1)
    image = reference_for_sampling(other, 64)
    assert image.size == (64, 64) and image.mode == "RGB"


# ---------------------------------------------------------------------- predict against the pipelines


def _capture_first_call(transformer: torch.nn.Module) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    seen: dict = {}

    def hook(_module: torch.nn.Module, _args: tuple, kwargs: dict, output: tuple) -> None:
        if not seen:
            seen.update(kwargs={k: v for k, v in kwargs.items()}, output=output[0].detach().clone())

    return seen, transformer.register_forward_hook(hook, with_kwargs=True)


def _reference_png(tmp_path: Path, size: tuple[int, int]) -> Path:
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    path = tmp_path / "reference.png"
    Image.fromarray(pixels).save(path)
    return path


@contextlib.contextmanager
def _time_offset_zero(monkeypatch: pytest.MonkeyPatch, family: ModuleType) -> Iterator[None]:
    """The family's reference tokens placed at the target's time/index coordinate (0) instead of their own."""
    tokens_of = family._reference_tokens

    def at_zero(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, ids = tokens_of(*args)
        ids = ids.clone()
        ids[..., 0] = 0
        return tokens, ids

    with monkeypatch.context() as patch:
        patch.setattr(family, "_reference_tokens", at_zero)
        yield


def test_flux2_predict_with_a_reference_is_the_pipelines_own_transformer_call(demo_dir: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(demo_dir / "flux2")
    reference = _reference_png(tmp_path, (64, 128))  # a portrait reference for a landscape target: ids differ
    seen, handle = _capture_first_call(pipe.transformer)
    pipe(image=Image.open(reference), prompt="make it red", height=64, width=128, num_inference_steps=1,
         guidance_scale=1.0, max_sequence_length=64, text_encoder_out_layers=(1, 2, 3),
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    kwargs, tokens = seen["kwargs"], 4 * 8  # a 64x128 target: 4x8 latent tokens of 128 channels
    noisy = kwargs["hidden_states"][:, :tokens].permute(0, 2, 1).reshape(1, 128, 4, 8)
    latents = flux2.encode_images(pipe, load_pixels(reference, 64, 128).unsqueeze(0))
    assert torch.allclose(latents.reshape(1, 128, -1).permute(0, 2, 1), kwargs["hidden_states"][:, tokens:],
                          atol=1e-5)  # our cached reference latents are the pipeline's reference tokens
    text = {"prompt_embeds": kwargs["encoder_hidden_states"]}
    with torch.no_grad():
        ours = flux2.predict(pipe.transformer, noisy, kwargs["timestep"], text, None, reference=latents)
        without = flux2.predict(pipe.transformer, noisy, kwargs["timestep"], text, None)
    expected = seen["output"][:, :tokens].permute(0, 2, 1).reshape(1, 128, 4, 8)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(without, expected, atol=1e-3)  # the reference tokens change the prediction
    with _time_offset_zero(monkeypatch, flux2), torch.no_grad():  # the ids matter: the wrong offset is caught
        assert not torch.allclose(flux2.predict(pipe.transformer, noisy, kwargs["timestep"], text, None, latents),
                                  expected, atol=1e-3)


def test_flux1_kontext_predict_with_a_reference_is_the_pipelines_own_transformer_call(
        demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import FluxKontextPipeline, FluxPipeline

    # The FLUX.1 demo transformer has the guidance embedding Kontext uses: the same class, a Kontext pipeline.
    pipe = FluxKontextPipeline(**FluxPipeline.from_pretrained(demo_dir / "flux1").components)
    reference = _reference_png(tmp_path, (64, 128))
    seen, handle = _capture_first_call(pipe.transformer)
    pipe(image=Image.open(reference), prompt="make it red", height=64, width=128, max_area=64 * 128,
         _auto_resize=False, num_inference_steps=1, guidance_scale=2.5, max_sequence_length=64,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    kwargs, tokens = seen["kwargs"], 4 * 8  # 2x2 patches of an 8x16 latent grid
    noisy = FluxPipeline._unpack_latents(kwargs["hidden_states"][:, :tokens], 8, 16, 1)
    latents = flux1.encode_images(pipe, load_pixels(reference, 64, 128).unsqueeze(0))
    packed = FluxPipeline._pack_latents(latents, 1, 16, 16, 8)
    assert torch.allclose(packed, kwargs["hidden_states"][:, tokens:], atol=1e-5)
    text = {"prompt_embeds": kwargs["encoder_hidden_states"], "pooled_prompt_embeds": kwargs["pooled_projections"]}
    with torch.no_grad():
        ours = flux1.predict(pipe.transformer, noisy, kwargs["timestep"], text, kwargs["guidance"],
                             reference=latents)
        without = flux1.predict(pipe.transformer, noisy, kwargs["timestep"], text, kwargs["guidance"])
    expected = FluxPipeline._unpack_latents(seen["output"][:, :tokens], 8, 16, 1)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(without, expected, atol=1e-3)
    with _time_offset_zero(monkeypatch, flux1), torch.no_grad():
        assert not torch.allclose(flux1.predict(pipe.transformer, noisy, kwargs["timestep"], text, kwargs["guidance"],
                                                latents), expected, atol=1e-3)


# ---------------------------------------------------------------------- training and caching on the demo


def test_training_on_the_demo_pairs_changes_the_lora_and_samples_from_the_reference(
        demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...] | None] = []
    predict = flux2.predict

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        reference = args[5] if len(args) > 5 else kwargs.get("reference")
        seen.append(None if reference is None else tuple(reference.shape))
        return predict(*args, **kwargs)

    monkeypatch.setattr(flux2, "predict", spy)
    spec = _spec(demo_dir, tmp_path / "out", "train.max_steps=4", "sample.prompts=['make the circle red']",
                 "sample.every_steps=0")
    session, events = _run(spec)
    try:
        assert len(session.items) == 8 and all(r is not None for r in session.references)
        assert seen == [(2, 128, 4, 4)] * 4  # every step: a batch of 2 references of the target's shape
        assert all(math.isfinite(loss) for loss in session.losses)
        lora = load_file(str(tmp_path / "out" / "demo_edit_lora.safetensors"))
        assert any(name.endswith("lora_B.weight") and value.abs().sum() > 0 for name, value in lora.items())
        sample = tmp_path / "out" / "samples" / "step000004_0.png"
        assert Image.open(sample).size == (64, 64)  # the first pair's reference sets the size
    finally:
        session.end()


def test_loosely_matched_references_of_two_shapes_never_share_a_batch(demo_dir: Path, tmp_path: Path) -> None:
    _pairs(tmp_path / "targets", tmp_path / "refs", (128, 128), (160, 96), 2)
    _pairs(tmp_path / "targets", tmp_path / "refs", (128, 128), (96, 160), 2, start=2)
    session, _ = _run(_spec(demo_dir, tmp_path / "out", *_folders(tmp_path, "loose"), "train.max_steps=4"))
    try:
        shapes = {tuple(r.shape[-2:]) for r in session.references}
        assert shapes == {(96 // 16, 160 // 16), (160 // 16, 96 // 16)}
        for batch in [session._next_batch() for _ in range(4)]:
            assert len({tuple(session.references[i].shape) for i in batch}) == 1
    finally:
        session.end()


def test_reference_latents_are_cached_on_disk_and_reused(demo_dir: Path, tmp_path: Path) -> None:
    overrides = ("train.max_steps=1", "data.cache_latents='disk'", f"data.cache_dir='{tmp_path / 'cache'}'")
    first, events = _run(_spec(demo_dir, tmp_path / "one", *overrides))
    stored = [r.clone() for r in first.references]
    first.end()
    assert len(list((tmp_path / "cache" / "references").rglob("*.safetensors"))) == 8
    assert "references: 0 reused, 8 computed" in next(e.message for e in events if isinstance(e, LogMessage)
                                                      and e.message.startswith("caches:"))
    second, events = _run(_spec(demo_dir, tmp_path / "two", *overrides))
    try:
        summary = next(e.message for e in events if isinstance(e, LogMessage) and e.message.startswith("caches:"))
        assert "latents: 8 reused, 0 computed" in summary and "references: 8 reused, 0 computed" in summary
        assert all(torch.equal(a, b) for a, b in zip(stored, second.references, strict=True))
    finally:
        second.end()


def test_kontext_trains_on_the_pairs_and_samples_from_the_reference(demo_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The FLUX.1 demo weights under the kontext flavour (at the demo's sizes): its FluxKontextPipeline, its packing,
    # its sampling.
    from trainer import registry

    monkeypatch.setitem(registry.FAMILIES["flux1"].flavours, "kontext", demo_shaped_flavour("flux1", "kontext"))
    source = as_kontext_folder(demo_dir / "flux1", tmp_path / "kontext")
    spec = _spec(demo_dir, tmp_path / "out", "model.family='flux1'", "model.flavour='kontext'",
                 f"model.source='{source}'", "sample.prompts=['make the circle red']", "sample.resolution=64",
                 "sample.steps=1")
    session, _ = _run(spec)
    try:
        assert type(session.pipe).__name__ == "FluxKontextPipeline"
        assert {tuple(r.shape) for r in session.references} == {(1, 16, 8, 8)}
        assert len(session.losses) == 2 and all(math.isfinite(loss) for loss in session.losses)
        assert Image.open(tmp_path / "out" / "samples" / "step000002_0.png").size == (64, 64)
    finally:
        session.end()
