"""The quick start's logic (ui/quickstart.py): the model for each GPU with its costs in words, the whole form
filled from the profile's preset with the user's images, trigger and name, and the estimator's one-line verdict
against this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.demo import DEMO_STEPS
from ui import form, quickstart
from ui.quickstart import NO_GPU_NOTE, choose, fill, model_words, verdict_line


@pytest.mark.parametrize(("profile", "flavour", "preset"), [
    ("cpu-only", "demo", "flux2-demo"),
    ("rtx-3060ti-8gb", "klein-base-4b", "flux2-klein-base-4b-8gb"),
    ("rtx-4090-24gb", "klein-base-9b", "flux2-klein-base-9b-24gb"),
    ("no such gpu", "demo", "flux2-demo"),
])
def test_each_gpu_gets_a_flavour_and_its_preset(profile, flavour, preset):
    choice = choose(profile)
    assert (choice.family, choice.flavour, choice.preset) == ("flux2", flavour, preset)


def test_the_model_is_described_with_its_download_and_first_run_ram():
    assert model_words(choose("rtx-3060ti-8gb")).startswith(
        "**FLUX.2 [klein] base 4B** — about 16 GB to download once (from `black-forest-labs/FLUX.2-klein-base-4B`); "
        "the first run needs about 8 GiB of RAM (it loads the text encoder")  # int8 text encoder, one model at a time
    assert NO_GPU_NOTE in model_words(choose("cpu-only")) and "Real FLUX models need an NVIDIA GPU" in NO_GPU_NOTE
    assert "No NVIDIA GPU was found on this machine" in model_words(choose("rtx-3060ti-8gb"), gpu_found=False)


def test_the_form_is_filled_from_the_preset_with_the_users_images_trigger_and_name(tmp_path: Path):
    demo = tmp_path / ".studio" / "demo"
    filled = fill(choose("rtx-3060ti-8gb"), tmp_path, demo, str(tmp_path / "datasets" / "cat"), "ohwx", "cat")
    assert filled.ok, filled.problems
    spec = form.form_to_spec(filled.values, filled.hidden)
    assert (spec.model.flavour, spec.model.source, spec.lora.rank) == ("klein-base-4b", "", 16)  # hub, the preset
    assert spec.data.datasets[0].path == str(tmp_path / "datasets" / "cat") and spec.data.datasets[0].trigger == "ohwx"
    assert spec.output.dir == str(tmp_path / "output" / "cat") and spec.output.name == "cat"
    assert spec.sample.prompts == ["ohwx", "a photo of ohwx in a sunny park"]
    assert spec.lowvram.vram_gib == 7.6  # the profile's layer
    line = verdict_line(spec, choose("rtx-3060ti-8gb"), ram_gib=64)
    assert line.startswith("fits — ") and "GiB VRAM of the GeForce RTX 3060 Ti 8 GB's 7.6 GiB" in line
    assert verdict_line(spec, choose("rtx-3060ti-8gb"), ram_gib=8).startswith("will not fit — ")  # RAM decides

    demo_job = fill(choose("cpu-only"), tmp_path, demo, "", "", "first")
    spec = form.form_to_spec(demo_job.values, demo_job.hidden)
    assert spec.model.source == str(demo / "flux2") and spec.data.datasets[0].path == str(demo / "dataset")
    assert spec.train.max_steps == DEMO_STEPS  # the demo preset


def test_what_is_missing_is_named_by_its_field(tmp_path: Path):
    filled = fill(choose("rtx-3060ti-8gb"), tmp_path, tmp_path / "demo", "", "x", "")
    assert filled.problems == ["Images: upload images or give their folder first",
                               "LoRA name: give the LoRA a name, e.g. my_style"]
    filled = fill(choose("cpu-only"), tmp_path, tmp_path / "demo", "", "x", "../up")
    assert not filled.ok and "output.name" in filled.problems[0]


def test_the_gpu_menu_offers_every_profile_and_the_default_is_this_machine():
    names = [name for _, name in quickstart.gpu_choices()]
    assert "cpu-only" in names and "" not in names
    assert quickstart.default_gpu() in names
