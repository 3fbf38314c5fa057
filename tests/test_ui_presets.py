"""Hardware profiles and presets in the form: the detected GPU's profile is preselected, presets are offered per
flavour, and a fill merges defaults < profile < preset < the user's edits through trainer.profiles.apply_layers.
Pure python except the last test, which builds the Blocks (no server, no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.profiles import apply_layers, get_preset, get_profile, list_presets, list_profiles
from trainer.spec import deep_merge, parse_spec
from ui import form, presets

EIGHT_GB, KLEIN_8GB, KLEIN_12GB = "rtx-3060ti-8gb", "flux2-klein-base-9b-8gb", "flux2-klein-base-9b-12gb"


@pytest.fixture
def detected(monkeypatch):
    """Pretend this machine has an RTX 3060 Ti 8 GB (detection is cached: cleared before and after)."""
    presets.detected_profile.cache_clear()
    monkeypatch.setattr(presets, "detect_profile", lambda: get_profile(EIGHT_GB))
    yield get_profile(EIGHT_GB)
    presets.detected_profile.cache_clear()


@pytest.fixture
def no_gpu(monkeypatch):
    presets.detected_profile.cache_clear()
    monkeypatch.setattr(presets, "detect_profile", lambda: None)
    yield
    presets.detected_profile.cache_clear()


def demo_values(workdir: Path) -> dict:
    return form.spec_to_values(parse_spec(form.default_job(workdir)))


def klein_values(workdir: Path) -> dict:
    """The demo job switched to klein-base-9B by hand (source emptied, as the Model tab does)."""
    return dict(demo_values(workdir), **{"model.flavour": "klein-base-9b", "model.source": ""})


# ---------------------------------------------------------------------- the menus


def test_the_detected_gpu_is_preselected(detected):
    assert presets.default_profile() == EIGHT_GB
    names = [name for _, name in presets.profile_choices()]
    assert names[0] == presets.NO_PROFILE and set(names[1:]) == {p.name for p in list_profiles()}
    assert ("GeForce RTX 3060 Ti 8 GB (7.6 GiB usable)", EIGHT_GB) in presets.profile_choices()


def test_without_a_gpu_the_cpu_profile_is_preselected_and_says_no_gpu_once(no_gpu, monkeypatch):
    monkeypatch.setattr(presets.shutil, "which", lambda name: None)  # no nvidia-smi either
    assert presets.default_profile() == "cpu-only"
    label = dict((name, label) for label, name in presets.profile_choices())["cpu-only"]
    assert label == "CPU only (no NVIDIA GPU)"
    monkeypatch.setattr(presets.shutil, "which", lambda name: "/usr/bin/nvidia-smi")  # a GPU NVML cannot name
    assert presets.default_profile() == presets.NO_PROFILE


def test_a_gpu_no_file_names_gets_its_own_entry(monkeypatch):
    from trainer.profiles import Profile

    presets.detected_profile.cache_clear()
    odd = Profile(name="detected", label="Some GPU (20 GB, no profile)", vram_gib=19.0, total_vram_gib=20.0,
                  ram_gib_hint=32.0, bf16=True, fp8=False, presets=get_profile("rtx-4060ti-16gb").presets)
    monkeypatch.setattr(presets, "detect_profile", lambda: odd)
    try:
        assert presets.default_profile() == "detected"
        assert ("Some GPU (20 GB, no profile) (19 GiB usable)", "detected") in presets.profile_choices()
        assert presets.suggested_preset("detected", "flux2", "klein-base-9b") == "flux2-klein-base-9b-16gb"
    finally:
        presets.detected_profile.cache_clear()


def test_presets_are_offered_per_flavour_with_the_profiles_suggestion():
    for family, flavour in (("flux2", "klein-base-9b"), ("flux1", "dev")):
        names = [name for _, name in presets.preset_choices(family, flavour)]
        assert names == [p.name for p in list_presets(family, flavour)] and names
        assert all(get_preset(name).flavour == flavour for name in names)
    assert [name for _, name in presets.preset_choices("flux2", "demo")] == ["flux2-demo"]  # the first look
    assert presets.suggested_preset(EIGHT_GB, "flux2", "demo") is None  # offered, never pushed on real hardware
    assert presets.suggested_preset(EIGHT_GB, "flux2", "klein-base-9b") == KLEIN_8GB
    assert presets.suggested_preset(EIGHT_GB, "flux2", "dev") is None  # the profile suggests none for dev
    assert presets.suggested_preset(presets.NO_PROFILE, "flux2", "klein-base-9b") is None


# ---------------------------------------------------------------------- filling the form


def test_a_fill_is_defaults_profile_preset_through_apply_layers(tmp_path):
    values = demo_values(tmp_path)
    demo = form.demo_dir(tmp_path).resolve()
    filled = presets.fill(values, None, values, EIGHT_GB, KLEIN_8GB, demo)
    assert filled.ok, filled.problems
    current = form.values_to_dict(values)
    layers = deep_merge(presets.defaults_layer(current), {"model": {"source": ""}})
    expected = parse_spec(apply_layers(layers, get_profile(EIGHT_GB), get_preset(KLEIN_8GB)))
    assert form.form_to_spec(filled.values, filled.hidden) == expected
    spec = expected
    assert (spec.model.flavour, spec.model.source) == ("klein-base-9b", "")  # the hub repo, not the demo folder
    assert spec.lowvram.vram_gib == get_preset(KLEIN_8GB).spec.get("lowvram", {}).get("vram_gib", 7.6)
    assert spec.data.datasets == form.form_to_spec(values).data.datasets  # the job's data stays
    assert spec.output.dir == values["output.dir"]
    assert spec.sample.prompts == form.form_to_spec(values).sample.prompts  # what to show stays too
    assert spec.train.learning_rate != 0.005  # the demo's tiny-model rate is not an edit: it goes
    assert filled.message.startswith("applied profile GeForce RTX 3060 Ti 8 GB and preset ")


def test_the_users_edits_survive_one_preset_after_another(tmp_path):
    demo = form.demo_dir(tmp_path).resolve()
    start = demo_values(tmp_path)
    edited = dict(klein_values(tmp_path), **{"lora.rank": 64, "dataset.trigger": "ohwx"})
    first = presets.fill(edited, None, start, EIGHT_GB, KLEIN_8GB, demo)
    assert first.ok, first.problems
    assert first.values["lora.rank"] == 64 and first.values["dataset.trigger"] == "ohwx"
    second = presets.fill(first.values, first.hidden, first.baseline, EIGHT_GB, KLEIN_12GB, demo)
    assert second.ok, second.problems
    spec = form.form_to_spec(second.values, second.hidden)
    twelve = get_preset(KLEIN_12GB).spec
    assert spec.lora.rank == 64  # the user's edit wins over both presets
    assert spec.model.base_precision == twelve["model"].get("base_precision", "bf16")
    assert spec.lowvram.blocks_to_swap == twelve["lowvram"]["blocks_to_swap"] != \
        get_preset(KLEIN_8GB).spec["lowvram"]["blocks_to_swap"]  # the first preset's value is gone
    assert spec.data.datasets[0].trigger == "ohwx"


def test_a_profile_alone_sets_the_memory_to_plan_for(tmp_path):
    values = klein_values(tmp_path)
    filled = presets.fill(values, None, demo_values(tmp_path), EIGHT_GB, None, form.demo_dir(tmp_path))
    assert filled.ok, filled.problems
    assert filled.values["lowvram.vram_gib"] == "7.6" and filled.values["model.flavour"] == "klein-base-9b"


def test_fields_of_a_loaded_job_without_a_control_are_kept(tmp_path):
    values = klein_values(tmp_path)
    loaded = deep_merge(form.values_to_dict(values), {"train": {"distributed": "ddp"}})  # the Run tab sets it
    filled = presets.fill(values, loaded, demo_values(tmp_path), EIGHT_GB, KLEIN_8GB, form.demo_dir(tmp_path))
    assert filled.ok and form.form_to_spec(filled.values, filled.hidden).train.distributed == "ddp"


def test_a_fill_that_cannot_work_names_the_problem_and_changes_nothing(tmp_path):
    demo = form.demo_dir(tmp_path)
    values = demo_values(tmp_path)
    assert presets.fill(values, None, values, presets.NO_PROFILE, None, demo).problems == [
        "not applied: choose a hardware profile or a preset"]
    bad = presets.fill(dict(values, **{"lora.rank": 0}), None, values, EIGHT_GB, KLEIN_8GB, demo)
    assert not bad.ok and bad.values is None and bad.problems[0].startswith("lora.rank")
    missing = presets.fill(values, None, values, EIGHT_GB, "no-such-preset", demo)
    assert not missing.ok and "unknown preset 'no-such-preset'" in missing.message


def test_edits_are_what_differs_from_the_last_fill(tmp_path):
    start = demo_values(tmp_path)
    changed = dict(start, **{"lora.rank": 16, "dataset.path": "/elsewhere", "lowvram.override_blocks_to_swap": True})
    assert presets.edits(changed, start) == {"lora": {"rank": 16}, "lowvram": {"blocks_to_swap": 0}}
    assert presets.edits(start, start) == {}


# ---------------------------------------------------------------------- the app's wiring


def test_the_model_tab_has_the_menus_and_applies_them(tmp_path, detected):
    from trainer.runners.thread import TrainingRunner
    from ui.page import build_app

    blocks = build_app(TrainingRunner(), tmp_path)
    # (the same page, for free) gradio deletes what a page uploaded an hour after it came, not at the app's end
    assert blocks.delete_cache == (600, 3600) and blocks.upload_file_set in blocks.temp_file_sets
    by_label = {getattr(b, "label", None): b for b in blocks.blocks.values()}
    assert by_label["Hardware profile"].value == EIGHT_GB
    assert [name for _, name in by_label["Preset"].choices] == ["flux2-demo"]  # the demo flavour's only one
    assert by_label["Preset"].value is None
    menu = next(fn for fn in blocks.fns.values() if fn.fn is not None and fn.fn.__name__ == "preset_menu")
    update = menu.fn(EIGHT_GB, "flux2", "klein-base-9b")
    assert update["value"] == KLEIN_8GB and [name for _, name in update["choices"]][0] == KLEIN_8GB
    apply = next(fn for fn in blocks.fns.values() if fn.fn is not None and fn.fn.__name__ == "apply_profile_and_preset")
    assert {by_label["Hardware profile"]._id, by_label["Preset"]._id} <= {block._id for block in apply.inputs}
