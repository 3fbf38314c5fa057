"""Controls that follow other controls: training guidance only for flavours with a guidance embedding, and a
ComfyUI loras folder that ticks the format it receives (gradio imported; no app built)."""

from __future__ import annotations

import pytest

from trainer.spec import parse_spec
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
