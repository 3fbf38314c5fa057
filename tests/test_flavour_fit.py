"""A model folder or file is checked against the flavour the job names, before anything loads.

Each real flavour's transformer is its diffusers class built on the meta device at the flavour's own size: its
config.json and a header-only (sparse) weight file, in a diffusers folder and as a single BFL-layout file. Every
ordered pair of flavours of a family is refused both ways with the line that names what the model is and the flavour
to choose. FLUX.1 [dev], Krea and Kontext share one transformer (their weights differ, not their shapes): a Kontext
folder is told apart by its pipeline class, a single file cannot be.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.flavour_models import header_only_file
from trainer import registry
from trainer.__main__ import main
from trainer.sources.architecture import of_flavour
from trainer.sources.folder_fit import check_folder
from trainer.sources.recognise import check_file
from trainer.sources.transformer_keys import bfl_shapes, transformer_plan

REAL = {family: [f for f in registry.FAMILIES[family].flavours.values() if not f.is_demo] for family in ("flux2",
                                                                                                       "flux1")}
PAIRS = [(a, b) for family in REAL.values() for a, b in itertools.permutations(family, 2)]


def _checked(folder: Path, flavour: registry.Flavour, given: tuple[str, ...] = ()) -> str | None:
    """The folder check's lines as one text; None when the folder fits."""
    return "\n".join(check_folder(folder, flavour, given)) or None


def _same_transformer(a: registry.Flavour, b: registry.Flavour) -> bool:
    return of_flavour(a) == of_flavour(b)


def _transformer(flavour: registry.Flavour) -> object:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        return getattr(diffusers, flavour.transformer_class)(
            num_layers=flavour.double_blocks, num_single_layers=flavour.single_blocks,
            attention_head_dim=flavour.head_dim, num_attention_heads=flavour.num_heads,
            joint_attention_dim=flavour.joint_attention_dim, guidance_embeds=flavour.guidance == "embedded",
            in_channels=flavour.latent_channels * 4, **({"pooled_projection_dim": flavour.pooled_dim}
                                                         if flavour.family == "flux1" else {}))


def _real_width(flavour: registry.Flavour) -> registry.Flavour:
    from trainer.fabric.make import real_width

    return real_width(flavour)


def _write_models(root: Path, flavours: list[registry.Flavour]) -> dict[str, tuple[Path, Path]]:
    """flavour name (family/name) -> (diffusers folder, single BFL file), header only."""
    made = {}
    for flavour in flavours:
        key = f"{flavour.family}/{flavour.name}"
        folder = root / flavour.family / flavour.name
        model = _transformer(flavour)
        model.save_config(folder / "transformer")
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        header_only_file(folder / "transformer" / "diffusion_pytorch_model.safetensors", shapes)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": flavour.pipeline_class}))
        single = header_only_file(root / f"{flavour.family}-{flavour.name}.safetensors",
                                  bfl_shapes(transformer_plan(flavour.family, shapes), shapes))
        made[key] = (folder, single)
    return made


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return _write_models(tmp_path_factory.mktemp("flavours"), [f for flavours in REAL.values() for f in flavours])


SHALLOW = [_real_width(f) for family in REAL.values() for f in family]


@pytest.fixture(scope="module")
def shallow_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return _write_models(tmp_path_factory.mktemp("shallow"), SHALLOW)


@pytest.fixture
def shallow(shallow_files: dict[str, tuple[Path, Path]],
            monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Path, Path]]:
    """The real-size tests' models (trainer.fabric.real_width: the released widths, one double and one single
    block), every flavour's name meaning its shallow model during the test."""
    for flavour in SHALLOW:
        monkeypatch.setitem(registry.FAMILIES[flavour.family].flavours, flavour.name, flavour)
    return shallow_files


def _name(flavour: registry.Flavour) -> str:
    return f"{flavour.family}/{flavour.name}"


@pytest.mark.parametrize(("weights", "named"), PAIRS, ids=[f"{a.family}-{a.name}-as-{b.name}" for a, b in PAIRS])
def test_every_pair_of_flavours_is_refused_both_ways(weights: registry.Flavour, named: registry.Flavour,
                                                     models: dict[str, tuple[Path, Path]]) -> None:
    _assert_refused_both_ways(weights, named, models)


@pytest.mark.parametrize(("weights", "named"), PAIRS, ids=[f"{a.family}-{a.name}-as-{b.name}" for a, b in PAIRS])
def test_every_pair_of_real_width_shallow_models_is_refused_both_ways(
        weights: registry.Flavour, named: registry.Flavour, shallow: dict[str, tuple[Path, Path]]) -> None:
    family = registry.FAMILIES[weights.family].flavours
    _assert_refused_both_ways(family[weights.name], family[named.name], shallow)


def _assert_refused_both_ways(weights: registry.Flavour, named: registry.Flavour,
                              models: dict[str, tuple[Path, Path]]) -> None:
    folder, single = models[_name(weights)]
    in_folder, as_file = _checked(folder, named), check_file("transformer", single, named)
    if _same_transformer(weights, named):
        # only the pipeline class tells a Kontext folder from a [dev] one
        assert (in_folder is not None) == ("kontext" in (weights.name, named.name))
        assert as_file is None
        return
    where = folder / "transformer" / "config.json"
    for line, field, shown in ((in_folder, "model.source", where), (as_file, "model.transformer", single.name)):
        assert line is not None
        assert line.startswith(f"{field}: '{shown}' is ")
        assert weights.label in line.split(", not ")[0]  # what it is
        assert f"{weights.double_blocks} + {weights.single_blocks} blocks, width {weights.hidden_size}" in line
        assert f"not {named.label} (model.family = {named.family}, model.flavour = {named.name}" in line
        assert line.split("; ")[-1].startswith("choose model.flavour = ") and weights.name in line.split("; ")[-1]
    assert _checked(folder, weights) is None and check_file("transformer", single, weights) is None


def test_the_klein_4b_message_reads_as_the_issue_asks(models: dict[str, tuple[Path, Path]]) -> None:
    folder, _ = models["flux2/klein-base-4b"]
    assert _checked(folder, registry.get_flavour("flux2", "klein-base-9b")) == (
        f"model.source: '{folder / 'transformer' / 'config.json'}' is FLUX.2 [klein] base 4B: 5 + 20 blocks, width "
        "3072, not FLUX.2 [klein] base 9B (model.family = flux2, model.flavour = klein-base-9b: 8 + 24 blocks, width "
        "4096); choose model.flavour = klein-base-4b")
    schnell, _ = models["flux1/schnell"]
    assert _checked(schnell, registry.get_flavour("flux1", "dev")).endswith(
        "is FLUX.1 [schnell]: 19 + 38 blocks, width 3072, no guidance embedding, not FLUX.1 [dev] (model.family = "
        "flux1, model.flavour = dev: 19 + 38 blocks, width 3072, with a guidance embedding); choose model.flavour = "
        "schnell")


def test_a_text_encoder_or_vae_of_another_flavour_is_refused(models: dict[str, tuple[Path, Path]],
                                                             tmp_path: Path) -> None:
    from transformers import Qwen3Config

    nine = registry.get_flavour("flux2", "klein-base-9b")
    folder = tmp_path / "mixed"
    (folder / "transformer").mkdir(parents=True)
    source = models["flux2/klein-base-9b"][0] / "transformer" / "config.json"
    (folder / "transformer" / "config.json").write_text(source.read_text())
    (folder / "model_index.json").write_text(json.dumps({"_class_name": nine.pipeline_class}))
    Qwen3Config(hidden_size=2560, num_hidden_layers=36).save_pretrained(folder / "text_encoder")  # Qwen3-4B's
    assert _checked(folder, nine) == (
        f"model.source: '{folder / 'text_encoder' / 'config.json'}' is a qwen3 text encoder of width 2560 with 36 "
        "layers, not Qwen3-8B text encoder (hidden 4096); FLUX.2 [klein] base 9B stacks its hidden-state layers "
        "(9, 18, 27); point model.source at a FLUX.2 [klein] base 9B folder or give that text encoder in "
        "model.text_encoder")
    assert _checked(folder, nine, given=("text_encoder",)) is None  # a single file replaces it
    (folder / "text_encoder" / "config.json").unlink()
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16}))
    assert _checked(folder, nine) == (
        f"model.source: '{folder / 'vae' / 'config.json'}' is a AutoencoderKL with 16 latent channels, not the "
        "32-channel AutoencoderKLFlux2 FLUX.2 [klein] base 9B needs; point model.source at a FLUX.2 [klein] base 9B "
        "folder or give that VAE in model.vae")


@pytest.mark.parametrize(("family", "flavour"), [("flux2", "klein-base-4b"), ("flux1", "dev")])
def test_the_demo_folder_under_a_real_flavour_is_refused_by_every_command(demo_dir: Path, tmp_path: Path, capsys,
                                                                         family: str, flavour: str) -> None:
    job = demo_dir / ("job.toml" if family == "flux2" else "job_flux1.toml")
    sets = ["--set", f"model.flavour='{flavour}'", "--set", f"output.dir='{tmp_path / 'out'}'"]
    label = registry.get_flavour(family, flavour).label
    for command in ("validate", "train", "estimate"):
        assert main([command, str(job), *sets]) == 2, command
        err = capsys.readouterr().err
        assert "IndexError" not in err and "Traceback" not in err
        assert f"'{demo_dir / family / 'transformer' / 'config.json'}' is {registry.FAMILIES[family].label} demo " \
               f"(tiny, random weights): 2 + 2 blocks, width 128, not {label}" in err, (command, err)
        assert err.rstrip().endswith("choose model.flavour = demo"), (command, err)
    assert not (tmp_path / "out").exists()  # nothing was trained, nothing written



def test_a_hub_repo_of_another_flavour_is_refused_once_downloaded_before_it_loads(
        demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id is checked when its files arrive: the same line, naming the snapshot's config, and nothing loads."""
    import torch

    from tests.fake_hub import FakeHub, serving
    from trainer.errors import UserError
    from trainer.families import family_ops

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    klein = registry.get_flavour("flux2", "klein-base-4b")
    loaded = []
    monkeypatch.setattr("diffusers.Flux2KleinPipeline.from_pretrained", lambda *a, **k: loaded.append(a))
    with serving(FakeHub("acme/not-klein", demo_dir / "flux2"), tmp_path / "cache"), \
            pytest.raises(UserError) as caught:
        family_ops("flux2").load_pipeline("acme/not-klein", klein, torch.bfloat16)
    assert "transformer/config.json' is FLUX.2 demo (tiny, random weights): 2 + 2 blocks, width 128, not FLUX.2 " \
           "[klein] base 4B" in str(caught.value) and str(caught.value).endswith("choose model.flavour = demo")
    assert loaded == []
