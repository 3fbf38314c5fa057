"""Hardware profiles and presets: every shipped file parses, validates as part of a job and fits the GPU it names;
the merge order; detection through NVML (a stand-in); clear errors; `estimate --gpu`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import python_env
from trainer import profiles, registry
from trainer.estimator.job import estimate_job
from trainer.profiles import (
    Preset,
    Profile,
    ProfileError,
    apply_layers,
    detect_profile,
    get_preset,
    get_profile,
    list_presets,
    list_profiles,
)
from trainer.spec import JobSpec, deep_merge, parse_spec

ROOT = Path(__file__).resolve().parents[1]
PROFILES = list_profiles()
PRESETS = list_presets()
# what a user adds to a preset: a dataset, a model folder, a sample prompt (sampling is often the peak)
EDITS = {"model": {"source": "/models/flux"}, "data": {"datasets": [{"path": "/data/images"}]},
         "sample": {"prompts": ["a photo of sks"]}}


def _job(profile: Profile, preset: Preset, **edits: dict) -> JobSpec:
    return parse_spec(apply_layers({}, profile, preset, deep_merge(EDITS, edits)), preset.name)


def test_every_profile_parses_and_names_existing_presets() -> None:
    names = {p.name for p in PROFILES}
    assert {"cpu-only", "rtx-3060ti-8gb", "rtx-3060-12gb", "rtx-3080-10gb", "rtx-4060ti-16gb", "rtx-4070ti-12gb",
            "rtx-3090-24gb", "rtx-4090-24gb", "rtx-5090-32gb", "a100-40gb", "a100-80gb", "h100-80gb"} <= names
    presets = {p.name for p in PRESETS}
    for profile in PROFILES:
        assert profile.label and 0 <= profile.vram_gib <= profile.total_vram_gib, profile.name
        assert profile.ram_gib_hint >= 16
        for family, flavours in profile.presets.items():
            for flavour, preset in flavours.items():
                assert preset in presets, (profile.name, preset)
                assert (get_preset(preset).family, get_preset(preset).flavour) == (family, flavour)
    assert [p.vram_gib for p in PROFILES] == sorted(p.vram_gib for p in PROFILES)
    assert get_profile("cpu-only").layer() == {"model": {"base_precision": "fp32", "text_encoder_precision": "fp32"},
                                               "train": {"mixed_precision": "no"}, "lowvram": {"strategy": "none"}}


def test_presets_cover_the_flavours_and_tiers() -> None:
    tiers = {(p.family, p.flavour): {q.tier_gib for q in PRESETS if (q.family, q.flavour) == (p.family, p.flavour)}
             for p in PRESETS}
    for flavour in ("klein-base-4b", "klein-base-9b"):
        assert tiers["flux2", flavour] == {8, 12, 16, 24, 48}
    assert tiers["flux1", "dev"] == {8, 12, 16, 24, 48}
    assert tiers["flux2", "dev"] >= {24, 48}
    for flavour in ("krea", "schnell", "kontext"):
        assert tiers["flux1", flavour] >= {8, 12, 24}
    # the 8 GB klein-9B preset as designed
    klein = get_preset("flux2-klein-base-9b-8gb").spec
    assert klein["model"]["base_precision"] == "fp8" and klein["lora"]["rank"] == 16
    assert klein["lowvram"] == {"strategy": "aggressive", "blocks_to_swap": 25, "gradient_checkpointing": True,
                                "cpu_offload_checkpointing": True, "fused_backward": True}
    assert 25 <= registry.get_flavour("flux2", "klein-base-9b").max_blocks_to_swap
    assert (klein["data"]["cache_latents"], klein["data"]["cache_text_embeddings"]) == ("disk", "disk")
    assert (klein["train"]["batch_size"], klein["train"]["gradient_accumulation"],
            klein["train"]["learning_rate"]) == (1, 4, 1e-4)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates_as_a_job_and_fits_its_profile(preset: Preset) -> None:
    profile = get_profile(preset.profile)
    assert profile.total_vram_gib <= preset.tier_gib + 0.5  # sized on the smallest card of its tier
    spec = _job(profile, preset)
    assert spec.lowvram.vram_gib == profile.vram_gib  # from the profile
    assert (spec.model.family, spec.model.flavour) == (preset.family, preset.flavour)
    swap = spec.lowvram.blocks_to_swap
    assert swap is None or swap <= registry.get_flavour(preset.family, preset.flavour).max_blocks_to_swap
    result = estimate_job(spec)  # judged against the job's planned memory, the profile's
    assert result.verdict in ("fits", "tight"), (result.vram_gib, profile.vram_gib, result.suggestion)


def test_every_preset_comments_its_settings() -> None:
    for preset in PRESETS:
        lines = preset.path.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), preset.name
        table = ""
        for index, line in enumerate(lines):
            if line.startswith("["):
                table = line.split("]")[0].strip("[")
                continue
            # every setting but the metadata and the model's name says why, inline or on the line above
            if line and not line.startswith("#") and table != "preset" and not line.startswith(("family", "flavour")):
                assert "#" in line or lines[index - 1].startswith("#"), (preset.name, line)


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.presets], ids=lambda p: p.name)
def test_each_profile_suggests_presets_that_fit_it_in_vram_and_ram(profile: Profile) -> None:
    for flavours in profile.presets.values():
        for name in flavours.values():
            preset = get_preset(name)
            assert preset.tier_gib <= profile.total_vram_gib + 0.5
            spec = _job(profile, preset)
            assert estimate_job(spec).verdict in ("fits", "tight"), (profile.name, name)
            # the first run loads the text encoder to RAM; the hint leaves 2 GiB for the system
            cold = _job(profile, preset, data={"cache_text_embeddings": "memory"})
            assert estimate_job(cold).ram_gib + 2 <= profile.ram_gib_hint, (profile.name, name)


def test_layers_merge_defaults_then_profile_then_preset_then_edits() -> None:
    defaults = {"lowvram": {"vram_gib": 99.0, "strategy": "auto"}, "train": {"max_steps": 10, "batch_size": 8},
                "lora": {"rank": 4, "alpha": 4.0}}
    profile = Profile(name="p", label="P", vram_gib=11.5, total_vram_gib=12.0, ram_gib_hint=32, bf16=True,
                      fp8=False, defaults={"train": {"batch_size": 2, "max_steps": 20}, "lora": {"rank": 8}})
    preset = Preset(name="q", label="Q", description="", tier_gib=12, profile="p",
                    spec={"lora": {"rank": 16}, "lowvram": {"strategy": "aggressive"}, "train": {"max_steps": 30}})
    merged = apply_layers(defaults, profile, preset, {"lora": {"rank": 32}})
    assert merged["lowvram"] == {"vram_gib": 11.5, "strategy": "aggressive"}  # profile over defaults, preset over
    assert merged["train"] == {"max_steps": 30, "batch_size": 2}
    assert merged["lora"] == {"rank": 32, "alpha": 4.0}
    assert apply_layers(defaults, profile, preset, {"lowvram": {"vram_gib": 10.0}})["lowvram"]["vram_gib"] == 10.0
    assert defaults["lowvram"]["vram_gib"] == 99.0  # nothing is mutated
    # by name, and with shipped files: the profile's memory, the preset's keys, the edits on top
    job = apply_layers({"train": {"max_steps": 5}}, "rtx-3060ti-8gb", "flux2-klein-base-9b-8gb", EDITS)
    assert job["lowvram"]["vram_gib"] == 7.6 and job["lowvram"]["blocks_to_swap"] == 25
    assert job["train"]["max_steps"] == 5 and job["model"]["source"] == "/models/flux"
    assert apply_layers({"a": {"b": 1}}) == {"a": {"b": 1}}


def test_bad_files_and_names_are_reported_with_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text("[profile]\nlabel = 'x\n")
    with pytest.raises(ProfileError, match=r"broken\.toml: not valid TOML"):
        list_profiles(tmp_path)
    (tmp_path / "broken.toml").write_text("[profile]\nlabel = 3\nvram_gib = true\nsize = 1\n")
    with pytest.raises(ProfileError) as error:
        list_profiles(tmp_path)
    problems = error.value.problems
    assert "profile.label: expected str, got 3" in problems and "profile.vram_gib: expected a number, got True" in \
        problems and any(p.startswith("profile.size: unknown key") for p in problems)
    assert any(p == "profile.bf16: required but missing" for p in problems)
    assert str(tmp_path / "broken.toml") in str(error.value)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "p.toml").write_text("[preset]\nlabel = 'x'\ntier_gib = 8\nprofile = 'p'\n"
                                                 "[lowvarm]\nx = 1\n")
    with pytest.raises(ProfileError) as error:
        list_presets(directory=tmp_path / "presets")
    assert any(p.startswith("lowvarm: unknown key") for p in error.value.problems)
    assert any(p.startswith("model: a preset names the family") for p in error.value.problems)
    with pytest.raises(ProfileError, match="unknown hardware profile 'rtx-9090'; known: cpu-only"):
        get_profile("rtx-9090")
    with pytest.raises(ProfileError, match="unknown preset 'nope'; known: flux1-"):
        get_preset("nope")


class FakeNvml:
    """pynvml's calls the detection uses, answering for one GPU (or failing like a machine without one)."""

    def __init__(self, name: str | None, total_gib: float = 0.0, capability: tuple[int, int] = (8, 6)) -> None:
        self.name, self.total, self.capability, self.shut = name, int(total_gib * 1024**3), capability, False

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.name is None:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return self.name or ""

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=self.total)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return self.capability


@pytest.mark.parametrize(("name", "gib", "expected"), [
    ("NVIDIA GeForce RTX 3060 Ti", 8.0, "rtx-3060ti-8gb"),
    ("NVIDIA GeForce RTX 3060", 12.0, "rtx-3060-12gb"),
    ("NVIDIA GeForce RTX 4090", 23.99, "rtx-4090-24gb"),
    ("NVIDIA A100-SXM4-80GB", 80.0, "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", 39.6, "a100-40gb"),
    ("NVIDIA H100 80GB HBM3", 79.6, "h100-80gb"),
])
def test_detection_matches_name_and_memory(name: str, gib: float, expected: str) -> None:
    nvml = FakeNvml(name, gib)
    assert detect_profile(nvml).name == expected and nvml.shut


def test_detection_without_a_gpu_and_of_an_unknown_one() -> None:
    assert detect_profile(FakeNvml(None)) is None
    # an 8 GB RTX 3060 is not the 12 GB profile: a profile of its own, with the presets of the 8 GB card
    odd = detect_profile(FakeNvml("NVIDIA GeForce RTX 3060", 8.0))
    assert odd.name == "detected" and odd.vram_gib == pytest.approx(7.6) and odd.bf16 and not odd.fp8
    assert odd.presets == get_profile("rtx-3060ti-8gb").presets
    assert odd.layer() == {"lowvram": {"vram_gib": odd.vram_gib}}
    ada = detect_profile(FakeNvml("NVIDIA RTX 4000 Ada Generation", 20.0, (8, 9)))
    assert ada.fp8 and ada.presets == get_profile("rtx-4060ti-16gb").presets


def test_gpu_option_takes_a_profile_a_number_or_detect(tmp_path: Path) -> None:
    assert profiles.gpu_vram_gib("12") == (12.0, "12 GiB")
    assert profiles.gpu_vram_gib("rtx-3090-24gb") == (23.5, "GeForce RTX 3090 24 GB (rtx-3090-24gb)")
    assert profiles.gpu_vram_gib("cpu-only")[0] is None
    job = tmp_path / "job.toml"
    job.write_text('[model]\nfamily = "flux2"\nflavour = "klein-base-9b"\nbase_precision = "fp8"\n'
                   '[[data.datasets]]\npath = "x"\n[data]\nresolution = 1024\n')
    run = subprocess.run([sys.executable, "-m", "trainer", "estimate", str(job), "--gpu", "rtx-3060ti-8gb", "--json"],
                         capture_output=True, text=True, env=python_env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["gpu"] == "GeForce RTX 3060 Ti 8 GB (rtx-3060ti-8gb)" and report["verdict"] in ("fits", "tight")
    assert "blocks swapped" in report["plan"]  # auto planned for the profile's 7.6 GiB
    both = subprocess.run([sys.executable, "-m", "trainer", "estimate", str(job), "--gpu", "8", "--gpu-vram", "8"],
                          capture_output=True, text=True, env=python_env(), cwd=ROOT)
    assert both.returncode == 2 and "use one" in both.stderr


def test_import_loads_no_torch() -> None:
    code = "import sys, trainer.profiles; trainer.profiles.list_presets(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(),
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
