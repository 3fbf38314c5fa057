"""The Model tab's "Single files (ComfyUI)" choices: form round trip of the single-file keys, a fake ComfyUI folder
of header-only safetensors files filling the slot menus, and the allowed-folders check (pure python, no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.flavour_models import header_only_file as _header_only
from trainer.folders import Folders
from trainer.spec import deep_merge, parse_spec
from ui import form, model_files

SINGLE_KEYS = ("model.comfy_models_dir", "model.transformer", "model.vae", "model.text_encoder",
               "model.text_encoder_2")




def _flux2_transformer(hidden: int, double: int, single: int) -> dict[str, tuple[int, ...]]:
    # the markers trainer.sources.recognise reads: shared modulation (FLUX.2, BFL layout), img_in rows, block counts
    shapes: dict[str, tuple[int, ...]] = {"double_stream_modulation_img.lin.weight": (6 * hidden, hidden),
                                          "img_in.weight": (hidden, 128)}
    shapes |= {f"double_blocks.{i}.img_attn.qkv.weight": (3 * hidden, hidden) for i in range(double)}
    shapes |= {f"single_blocks.{i}.linear1.weight": (3 * hidden, hidden) for i in range(single)}
    return shapes


FLUX2_VAE = {"decoder.conv_in.weight": (512, 32, 3, 3), "bn.running_mean": (128,)}


def _comfy_folder(root: Path) -> dict[str, Path]:
    models = root / "models"
    return {
        "klein4b": _header_only(models / "diffusion_models" / "flux-2-klein-base-4b.safetensors",
                                _flux2_transformer(3072, 5, 20)),
        "klein9b": _header_only(models / "unet" / "flux-2-klein-base-9b.safetensors", _flux2_transformer(4096, 8, 24)),
        # a VAE put among the transformers: it must not be offered as a fitting transformer
        "stray_vae": _header_only(models / "diffusion_models" / "stray-vae.safetensors", FLUX2_VAE),
        "vae": _header_only(models / "vae" / "flux2-vae.safetensors", FLUX2_VAE),
        "qwen4b": _header_only(models / "text_encoders" / "qwen_3_4b.safetensors", {
            "model.layers.0.post_attention_layernorm.weight": (2560,),
            "model.layers.0.self_attn.q_norm.weight": (128,)}),
    }


# ---------------------------------------------------------------------- form round trip


def test_a_job_without_single_files_keeps_them_unset(tmp_path):
    job = form.default_job(tmp_path)
    values = form.spec_to_values(parse_spec(job))
    assert all(values[key] == "" for key in SINGLE_KEYS)  # empty menus: every component from model.source
    data = form.values_to_dict(values)
    assert not set(data["model"]) & {key.split(".", 1)[1] for key in SINGLE_KEYS}  # unset, not written as ""
    assert form.form_to_spec(values) == parse_spec(job)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_a_job_with_single_files_round_trips_exactly(tmp_path, family):
    files = {"comfy_models_dir": str(tmp_path / "ComfyUI" / "models"), "transformer": "/m/flux.safetensors",
             "vae": "/m/ae.safetensors", "text_encoder": "/m/te.safetensors"}
    if family == "flux1":
        files["text_encoder_2"] = "/m/t5xxl_fp8_e4m3fn.safetensors"
    job = deep_merge(form.default_job(tmp_path, family), {"model": files})
    spec = parse_spec(job)
    values = form.spec_to_values(spec)
    assert {key: values[key] for key in SINGLE_KEYS if values[key]} == {f"model.{k}": v for k, v in files.items()}
    assert form.form_to_spec(values) == spec
    assert form.spec_to_values(form.form_to_spec(values)) == values
    # clearing a menu ("from source") removes the key again, even over the loaded job's hidden fields
    cleared = form.form_to_spec(dict(values, **{"model.vae": ""}), form.hidden_fields(spec))
    assert cleared.model.vae == "" and "vae" not in form.values_to_dict(dict(values, **{"model.vae": ""}))["model"]


# ---------------------------------------------------------------------- scanning a ComfyUI folder


def test_scan_fills_the_menus_for_klein_base_4b(tmp_path):
    files = _comfy_folder(tmp_path / "ComfyUI")
    result = model_files.scan(Folders.of(tmp_path), str(tmp_path / "ComfyUI"), "flux2", "klein-base-4b")
    assert result.ok, result.message
    choices = {key: dict((value, label) for label, value in pairs) for key, pairs in result.choices.items()}
    for key in model_files.SLOT_KEYS.values():
        assert result.choices[key][0] == model_files.FROM_SOURCE  # empty = from source, always first

    transformer = result.choices["model.transformer"]
    assert transformer[1][1] == str(files["klein4b"].resolve())  # the fitting file comes first
    assert not transformer[1][0].startswith(model_files.NOT_FITTING)
    label_9b = choices["model.transformer"][str(files["klein9b"].resolve())]
    assert label_9b.startswith(model_files.NOT_FITTING) and "klein-base-9b" in label_9b  # listed, with why
    fitting = {value for label, value in transformer[1:] if not label.startswith(model_files.NOT_FITTING)}
    assert str(files["stray_vae"].resolve()) not in fitting  # a VAE is no transformer
    assert fitting == {str(files["klein4b"].resolve())}

    assert list(choices["model.vae"])[1:] == [str(files["vae"].resolve())]
    assert "FLUX.2 VAE" in choices["model.vae"][str(files["vae"].resolve())]
    assert list(choices["model.text_encoder"])[1:] == [str(files["qwen4b"].resolve())]
    assert "Qwen3-4B" in choices["model.text_encoder"][str(files["qwen4b"].resolve())]
    assert result.choices["model.text_encoder_2"] == [model_files.FROM_SOURCE]
    assert not model_files.slot_visible("flux2", "text_encoder_2") and model_files.slot_visible("flux1", "vae")
    assert model_files.slot_visible("flux1", "text_encoder_2")


def test_a_chosen_file_gives_a_job_that_parses(tmp_path):
    files = _comfy_folder(tmp_path / "ComfyUI")
    values = form.spec_to_values(parse_spec(form.default_job(tmp_path)))
    values |= {"model.flavour": "klein-base-4b", "model.source": "", "model.comfy_models_dir": str(tmp_path),
               "model.transformer": str(files["klein4b"]), "model.text_encoder": str(files["qwen4b"])}
    spec = form.form_to_spec(values)
    assert (spec.model.transformer, spec.model.vae) == (str(files["klein4b"]), "")


def test_an_empty_or_missing_folder_lists_nothing(tmp_path):
    folders = Folders.of(tmp_path)
    assert model_files.scan(folders, "  ", "flux2", "klein-base-4b").choices == model_files.empty_choices()
    missing = model_files.scan(folders, "nowhere", "flux2", "klein-base-4b")
    assert not missing.ok and "does not exist" in missing.message


# ---------------------------------------------------------------------- the allowed-folders check


def test_a_folder_or_file_outside_the_allowed_folders_is_refused(tmp_path):
    workdir, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    _comfy_folder(elsewhere)
    folders = Folders.of(workdir)
    refused = model_files.scan(folders, str(elsewhere), "flux2", "klein-base-4b")
    assert not refused.ok and refused.choices == model_files.empty_choices()  # nothing of it was read
    assert refused.message.startswith("refused: the ComfyUI models folder")
    assert str(workdir.resolve()) in refused.message and "--allow" in refused.message
    outside = str(elsewhere / "models" / "vae" / "flux2-vae.safetensors")
    problems = model_files.refused_files(folders, {"model.vae": outside, "model.transformer": "",
                                                   "model.text_encoder": "qwen_3_4b.safetensors"})
    assert len(problems) == 1 and "model.vae" in problems[0] and str(workdir.resolve()) in problems[0]
    # the same file is offered once its folder is allowed at launch
    allowed = Folders.of(workdir, [elsewhere])
    assert model_files.scan(allowed, str(elsewhere), "flux2", "klein-base-4b").ok
    assert model_files.refused_files(allowed, {"model.vae": outside}) == []


def test_start_refuses_a_comfy_folder_outside_the_allowed_ones(tmp_path):
    from trainer.folders import spec_paths

    job = deep_merge(form.default_job(tmp_path), {"model": {"comfy_models_dir": "/opt/ComfyUI/models"}})
    problems = Folders.of(tmp_path).problems(spec_paths(parse_spec(job)))
    assert len(problems) == 1 and "model.comfy_models_dir" in problems[0]


def test_the_model_files_module_does_not_import_torch():
    code = "import sys, ui, ui.model_files, ui.model_tab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
