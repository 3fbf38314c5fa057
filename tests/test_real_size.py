"""Real widths on every commit: each family's transformer at its released widths (klein base 4B: 3072, 24 heads;
FLUX.1 dev: 3072 with its 768-wide pooled CLIP-L input) with one double and one single block, fabricated in both
layouts users have (the hub's sharded diffusers folder; ComfyUI's single files with BFL names). Both load to the
same weights, one trains a step and saves every LoRA format, and diffusers' own load_lora_weights reads each file
at the real widths with every key used. bench/rehearse.py does the same at full depth on this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer import registry
from trainer.fabric.lora_check import load_in_diffusers
from trainer.fabric.make import Fabricated, fabricate, real_width
from trainer.sources.recognise import read_header

CASES = {"flux2": "klein-base-4b", "flux1": "dev"}
FORMATS = {"flux2": ["diffusers", "comfyui"], "flux1": ["diffusers", "comfyui", "kohya"]}


@pytest.fixture(scope="module", params=list(CASES))
def fabricated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[registry.Flavour, dict[str, Fabricated], Path]]:
    family = request.param
    flavour = real_width(registry.get_flavour(family, CASES[family]))
    out = tmp_path_factory.mktemp(f"real_{family}")
    made = {layout: fabricate(flavour, layout, out / layout, small_encoders=True) for layout in ("hub", "comfy")}
    from trainer.demo import build_demo_dataset

    build_demo_dataset(out, count=2)
    with pytest.MonkeyPatch.context() as patch:  # the flavour's name now means the 1 + 1 block model
        patch.setitem(registry.FAMILIES[family].flavours, flavour.name, flavour)
        yield flavour, made, out / "dataset"


def _spec(flavour: registry.Flavour, made: Fabricated, dataset: Path, out: Path):  # noqa: ANN202
    from trainer.spec import parse_spec

    model = {"family": flavour.family, "flavour": flavour.name, "source": str(made.source),
             "base_precision": "bf16", "text_encoder_precision": "bf16",
             **{slot: str(path) for slot, path in made.files.items()}}
    return parse_spec({
        "model": model, "lora": {"rank": 4, "alpha": 4.0, "targets": "all"},
        "data": {"datasets": [{"path": str(dataset)}], "resolution": 64},
        "train": {"max_steps": 1, "batch_size": 1, "mixed_precision": "bf16", "seed": 1},
        "output": {"dir": str(out), "name": "wide", "formats": FORMATS[flavour.family], "save_state": False},
    })


def test_both_layouts_load_the_same_real_width_model(fabricated: tuple) -> None:
    from trainer.families import family_ops
    from trainer.sources import ModelFiles

    flavour, made, _ = fabricated
    ops = family_ops(flavour.family)
    hub = ops.load_pipeline(str(made["hub"].source), flavour, torch.bfloat16)
    files = ModelFiles(**{slot: str(path) for slot, path in made["comfy"].files.items()})
    comfy = ops.load_pipeline(str(made["comfy"].source), flavour, torch.bfloat16, files=files)
    # the hub folder is sharded like the hub's; the ComfyUI transformer has BFL names (fused qkv, swapped halves)
    assert (made["hub"].source / "transformer" / "config.json").is_file()
    assert "double_blocks.0.img_attn.qkv.weight" in read_header(made["comfy"].files["transformer"])
    assert hub.transformer.x_embedder.weight.shape[0] == flavour.hidden_size
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if getattr(hub, component, None) is None:
            continue
        ours, theirs = getattr(hub, component).state_dict(), getattr(comfy, component).state_dict()
        assert set(ours) == set(theirs), component
        different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
        assert not different, (component, different[:3])
        assert all(torch.isfinite(t).all() for t in ours.values() if t.is_floating_point())


@pytest.mark.slow  # a step of a 3072-wide transformer (0.5 B parameters) per family
def test_real_widths_train_and_save_every_format_diffusers_reads(fabricated: tuple, tmp_path: Path) -> None:
    from trainer.session import Session

    flavour, made, dataset = fabricated
    session = Session(_spec(flavour, made["comfy"], dataset, tmp_path))  # the same weights as the hub folder
    try:
        session.run()
        widths = {m.in_features for m in session.transformer.modules() if hasattr(m, "in_features")}
    finally:
        session.end()
    assert flavour.hidden_size in widths  # the model trained is at its real width
    written = sorted(tmp_path.glob("wide*.safetensors"))
    assert len(written) == len(FORMATS[flavour.family]), [p.name for p in written]
    for path in written:
        loaded = load_in_diffusers(path, flavour, made["hub"].source / "transformer")
        assert loaded.ok, (path.name, loaded)
        # every LoRA matrix of the file (A and B, alphas aside) became an adapter tensor in diffusers
        assert loaded.adapter_tensors >= loaded.file_tensors // 3 * 2 > 0
