"""Controls that follow other controls: training guidance only for flavours with a guidance embedding, and a
ComfyUI loras folder that ticks the format it receives (gradio imported; no app built)."""

from __future__ import annotations

import pytest

from trainer.spec import SpecError, deep_merge, parse_spec
from ui import form
from ui.advanced_tab import guidance_interactivity, guidance_mode_info, takes_guidance
from ui.training_tab import formats_for_comfy_folder


@pytest.mark.parametrize(("family", "flavour", "embedded"), [
    ("flux1", "dev", True), ("flux1", "kontext", True), ("flux2", "dev", True),
    ("flux1", "schnell", False), ("flux2", "klein-base-9b", False), ("flux2", "demo", False),
])
def test_training_guidance_is_editable_only_where_the_flavour_reads_it(family, flavour, embedded):
    assert takes_guidance(family, flavour) is embedded
    assert guidance_interactivity("constant", embedded) == (embedded, False)
    assert guidance_interactivity("random", embedded) == (False, embedded)
    info = guidance_mode_info(family, flavour)
    assert ("no guidance embedding" in info) is not embedded


def test_an_unknown_flavour_leaves_the_guidance_controls_editable():
    assert takes_guidance("flux2", "no-such-flavour") is True  # mid family switch: the spec check names it


def test_a_comfyui_folder_ticks_comfyui_so_the_copy_happens(tmp_path):
    assert formats_for_comfy_folder("/comfy/models/loras", ["diffusers"]) == ["diffusers", "comfyui"]
    assert formats_for_comfy_folder("/comfy/models/loras", ["kohya"]) is None  # kohya files are copied too
    assert formats_for_comfy_folder("  ", ["diffusers"]) is None
    values = form.spec_to_values(parse_spec(form.default_job(tmp_path)))
    values["output.comfy_lora_dir"] = "/comfy/models/loras"
    values["output.formats"] = formats_for_comfy_folder(values["output.comfy_lora_dir"], values["output.formats"])
    spec = form.form_to_spec(values)
    assert spec.output.formats == ["diffusers", "comfyui"] and spec.output.comfy_lora_dir == "/comfy/models/loras"


# ---------------------------------------------------------------------- every spec field has a control

# Spec fields the form deliberately has no control for, each with its reason; every other field must have one.
CLI_ONLY = {
    "spec_version": "the job file's format version, written by Save job; not a setting",
    "data.datasets": "the form edits the first dataset (its dataset.* controls); further datasets of a loaded job "
                     "(regularisation images) are kept as loaded",
    "dataset.resolution": "a per-dataset override of a loaded job's further datasets; the form's Resolution "
                          "(data.resolution) applies to every dataset, and a loaded value is kept",
    "dataset.is_regularisation": "the form's dataset is the subject; regularisation datasets are further datasets "
                                 "of a loaded job, kept as loaded",
    "train.distributed": "chosen with the GPUs for the run being started, by the Run tab's multi-GPU section "
                         "(ui/multi_gpu.py), which sets it on the job it launches",
}


def _spec_keys() -> list[str]:
    """Every setting of the job spec as the form names it: section.key, dataset.key for a dataset's."""
    from pydantic import BaseModel

    from trainer.spec import DatasetEntry, JobSpec

    keys = []
    for section, info in JobSpec.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            keys.append(section)
            continue
        keys += [f"{section}.{name}" for name in model.model_fields]
    return keys + [f"dataset.{name}" for name in DatasetEntry.model_fields]


def test_every_spec_field_has_a_control_or_a_stated_reason():
    without = [key for key in _spec_keys() if key not in form.FORM_KEYS and key not in CLI_ONLY]
    assert without == [], f"spec fields without a form control (add one, or a reason to CLI_ONLY): {without}"
    stale = [key for key in CLI_ONLY if key not in _spec_keys() or key in form.FORM_KEYS]
    assert stale == [], f"CLI_ONLY names fields that are gone or have a control now: {stale}"


# ---------------------------------------------------------------------- the new controls round-trip

# The settings #17 and #21 added, each at a value that differs from the default, on FLUX.1 dev with an nf4 base
# (where the modulation precision is read).
NEW_SETTINGS = {
    "model.text_encoder_precision": "int8", "model.modulation_precision": "nf4",
    "lowvram.swap_from": "disk", "lowvram.disk_read_gbps": "1.5", "lowvram.empty_cache_every": "10",
    "train.ema_decay": "0.999", "train.ema_device": "cpu", "train.compile": True,
    "advanced.attention": "xformers", "advanced.timestep_sampling": "mode", "advanced.mode_scale": 1.1,
    "sample.resolution": "768", "sample.use_ema": True, "sample.clip_score_model": "openai/clip-vit-base-patch32",
}


def _flux1_nf4(workdir) -> dict:
    job = form.default_job(workdir, "flux1")
    return deep_merge(job, {"model": {"flavour": "dev", "source": "", "base_precision": "nf4"},
                            "train": {"mixed_precision": "bf16"}})


def test_the_new_settings_map_to_the_spec_and_survive_save_load_and_the_last_form(tmp_path):
    from test_ui_state import FakeRunner

    from ui.studio import Studio

    values = dict(form.spec_to_values(parse_spec(_flux1_nf4(tmp_path))), **NEW_SETTINGS)
    spec = form.form_to_spec(values)
    assert (spec.model.text_encoder_precision, spec.model.modulation_precision) == ("int8", "nf4")
    low = spec.lowvram
    assert (low.swap_from, low.disk_read_gbps, low.empty_cache_every) == ("disk", 1.5, 10)
    assert (spec.train.ema_decay, spec.train.ema_device, spec.train.compile) == (0.999, "cpu", True)
    assert (spec.advanced.attention, spec.advanced.mode_scale) == ("xformers", 1.1)
    assert (spec.sample.resolution, spec.sample.use_ema) == (768, True)
    assert spec.sample.clip_score_model == "openai/clip-vit-base-patch32"
    assert form.spec_to_values(spec) == values  # the form shows what it sent
    studio = Studio(FakeRunner(), tmp_path)
    path, outcome = studio.save_job(values, path="jobs/new.toml")
    assert path is not None, outcome.problems
    loaded, hidden, outcome = studio.load_job("jobs/new.toml")
    assert outcome.ok and loaded == values and form.form_to_spec(loaded, hidden) == spec
    restored = Studio(FakeRunner(), tmp_path).restore()[0]  # Save job remembered the form for the next page load
    assert restored == values


def test_unset_settings_stay_unset_and_what_does_not_apply_sends_nothing(tmp_path):
    defaults = form.spec_to_values(parse_spec(_flux1_nf4(tmp_path)))
    assert (defaults["train.ema_decay"], defaults["train.ema_device"], defaults["sample.use_ema"]) == ("", "gpu", False)
    assert defaults["lowvram.swap_from"] == form.FROM_STRATEGY and defaults["lowvram.disk_read_gbps"] == ""
    assert defaults["model.modulation_precision"] == "auto" and defaults["sample.resolution"] == ""
    spec = form.form_to_spec(defaults)
    assert spec == parse_spec(_flux1_nf4(tmp_path))  # nothing set that the job did not set
    unset = spec.to_dict()
    assert "ema_device" not in unset["train"] and "use_ema" not in unset["sample"]
    assert not {"swap_from", "disk_read_gbps", "empty_cache_every"} & set(unset["lowvram"])
    # the EMA's device and sampling with it are greyed out without a decay: sent only beside one
    no_ema = form.form_to_spec(dict(defaults, **{"train.ema_device": "cpu", "sample.use_ema": True}))
    assert no_ema.train.ema_device is None and no_ema.sample.use_ema is None
    # the modulation precision is greyed out without a quantised FLUX.1 base: sent only where it is read
    bf16 = form.form_to_spec(dict(defaults, **{"model.base_precision": "bf16", "model.modulation_precision": "int8"}))
    assert bf16.model.modulation_precision == "auto"
    assert form.modulation_applies("flux1", "nf4") and not form.modulation_applies("flux1", "bf16")
    assert not form.modulation_applies("flux2", "fp8")


def test_bad_values_of_the_new_settings_are_named_by_field(tmp_path):
    defaults = form.spec_to_values(parse_spec(_flux1_nf4(tmp_path)))
    bad = dict(defaults, **{"train.ema_decay": "1.5", "lowvram.disk_read_gbps": "fast",
                            "lowvram.empty_cache_every": "-1", "sample.resolution": "32"})
    with pytest.raises(SpecError) as caught:
        form.form_to_spec(bad)
    assert {problem.loc for problem in caught.value.errors} == {
        "train.ema_decay", "lowvram.disk_read_gbps", "lowvram.empty_cache_every", "sample.resolution"}


# ---------------------------------------------------------------------- greyed out where they do not apply


def test_each_setting_says_why_it_is_greyed_out():
    from ui.advanced_tab import ema_sample_info, mode_scale_info
    from ui.model_tab import modulation_info
    from ui.training_tab import ema_device_info

    assert "FLUX.1 only" in modulation_info("flux2", "fp8")
    assert "only with a quantised base precision" in modulation_info("flux1", "bf16")
    assert modulation_info("flux1", "nf4").startswith("FLUX.1's AdaLN modulation")
    assert ema_device_info(False).startswith("needs an EMA") and ema_sample_info("").startswith("needs an EMA")
    assert "VRAM" in ema_device_info(True) and "EMA" in ema_sample_info("0.999")
    assert mode_scale_info("logit_normal") == "used by timestep sampling 'mode' only"


def test_the_attention_menu_shows_the_reason_validate_refuses_each_kernel_with(tmp_path):
    from trainer.attention import attention_problems, installed
    from ui.advanced_tab import _gpu_capability, attention_info

    info = attention_info("no", "fp32")
    assert info.startswith("sdpa (default)")
    for backend in ("flash", "sage", "xformers"):
        job = deep_merge(form.default_job(tmp_path), {"advanced": {"attention": backend}})
        refused = attention_problems(parse_spec(job), _gpu_capability() if installed(backend) else None)
        if refused:  # the page's words after the kernel's name are validate's
            assert f"{backend}: refused here, it {refused[0].split(chr(39) + ' ', 1)[1]}" in info
        else:
            assert f"{backend}: available here" in info


def test_where_blocks_wait_applies_only_when_the_plan_swaps_them(monkeypatch):
    from test_ui_lowvram import klein_values

    from ui import memory

    monkeypatch.setattr(memory, "_available_ram", lambda: 64.0)  # a fake machine with RAM to spare
    none = memory.swap_source(klein_values(**{"lowvram.strategy": "none"}), None, None)
    assert none is not None and not none.swaps and not none.reads_disk and "no block is swapped" in none.swap_info
    bundle = memory.swap_source(klein_values(**{"lowvram.strategy": "aggressive"}), None, None)  # the bundle swaps
    assert bundle.swaps and bundle.reads_disk and "blocks from ram)" in bundle.swap_info
    ram = memory.swap_source(klein_values(**{"lowvram.strategy": "aggressive", "lowvram.swap_from": "ram"}), None,
                             None)
    assert ram.swaps and not ram.reads_disk and "no disk is read" in ram.gbps_info
    assert memory.swap_source(klein_values(**{"lowvram.swap_prefetch": "x"}), None, None) is None  # problems


def test_the_estimator_panel_reads_the_new_settings(monkeypatch):
    from test_ui_lowvram import klein_values

    from ui import memory

    monkeypatch.setattr(memory, "_available_ram", lambda: 64.0)

    def estimate(**changes: object) -> dict:
        report = memory.estimate_form(klein_values(**changes), None, 0, None)
        assert report.ok, report.line
        return report.result

    plain = estimate()
    ema = estimate(**{"train.ema_decay": "0.999"})
    assert "lora EMA (fp32)" in ema["breakdown"] and ema["vram_gib"] > plain["vram_gib"]
    assert "lora EMA (fp32)" not in estimate(**{"train.ema_decay": "0.999", "train.ema_device": "cpu"})["breakdown"]
    assert estimate(**{"advanced.attention": "sage"})["vram_gib"] > plain["vram_gib"]  # its sampling workspace
    swapped = {"lowvram.strategy": "aggressive"}
    in_ram, on_disk = estimate(**swapped, **{"lowvram.swap_from": "ram"}), estimate(**swapped,
                                                                                    **{"lowvram.swap_from": "disk"})
    assert on_disk["ram_gib"] < in_ram["ram_gib"]
    slow = estimate(**swapped, **{"lowvram.swap_from": "disk", "lowvram.disk_read_gbps": "0.5"})
    assert any("at 0.5 GB/s (lowvram.disk_read_gbps)" in note for note in slow["notes"])
    cold = {"data.cache_text_embeddings": "memory", "lowvram.strategy": "conservative",
            "model.base_precision": "nf4"}  # the text encoder is the first run's peak
    assert estimate(**cold, **{"model.text_encoder_precision": "int8"})["first_run_ram_gib"] < \
        estimate(**cold)["first_run_ram_gib"]
    assert estimate(**{"sample.resolution": "256"})["vram_gib"] != plain["vram_gib"]
    flux1 = {"model.family": "flux1", "model.flavour": "dev", "model.base_precision": "nf4", "lora.targets": "all"}
    base = {modulation: estimate(**flux1, **{"model.modulation_precision": modulation})["components"]
            ["transformer (nf4)"] for modulation in ("bf16", "nf4")}
    assert base["bf16"] > base["nf4"] + 1  # 3.2 B modulation parameters in bf16 against 4 bits
    for changes in ({"train.compile": True}, {"lowvram.empty_cache_every": "5"},
                    {"sample.clip_score_model": "openai/clip-vit-base-patch32"}):
        estimate(**changes)  # accepted; no memory of their own in the estimate
