"""What the CLI trainer writes and says: presets under a job, the plan that ran, file modes, the ComfyUI copy, and
guidance a flavour would ignore. In-process (`main()`), on the demo."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from trainer.__main__ import main
from trainer.spec import SpecError, parse_spec

PRESET = """\
[preset]
label = "test"
description = "a preset under the demo job"
tier_gib = 8
profile = "rtx-3060ti-8gb"

[model]
family = "flux2"
flavour = "demo"

[lora]
rank = 2  # the job's own rank (8) wins

[train]
gradient_accumulation = 2  # the job says nothing: the preset's value counts
max_steps = 7  # --set wins
"""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_preset_run_records_its_plan_follows_the_umask_and_copies_to_comfyui(demo_dir: Path, tmp_path: Path,
                                                                                capsys) -> None:
    preset, out, comfy = tmp_path / "mine.toml", tmp_path / "out", tmp_path / "ComfyUI" / "loras"
    preset.write_text(PRESET)
    comfy.mkdir(parents=True)
    code = main(["train", str(demo_dir / "job.toml"), "--preset", str(preset), "--no-progress",
                 "--set", "train.max_steps=2", "--set", "sample.every_steps=0", "--set", "sample.prompts=[]",
                 "--set", f"output.dir='{out}'", "--set", f"output.comfy_lora_dir='{comfy}'"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    resolved = tomllib.loads((out / "job.resolved.toml").read_text())
    assert resolved["train"]["gradient_accumulation"] == 2 and resolved["lora"]["rank"] == 8
    assert resolved["train"]["max_steps"] == 2
    # the plan that ran, not "auto": the bundle and every setting of it
    plan = resolved["lowvram"]
    assert plan["strategy"] in ("none", "conservative", "aggressive", "extreme")
    assert {"blocks_to_swap", "gradient_checkpointing", "optimizer_offload", "text_encoder_device"} <= set(plan)
    assert f"low-VRAM plan: strategy {plan['strategy']}" in captured.out
    # only the diffusers format was asked for: the ComfyUI file is written for the copy, and the log says so
    copy = comfy / "demo_lora_comfyui.safetensors"
    assert copy.is_file() and (out / "demo_lora.safetensors").is_file()
    assert f"copied {copy.name} (comfyui layout) to ComfyUI's loras folder {comfy}" in captured.out
    mode = 0o666 & ~_umask()
    for path in (out / "demo_lora.safetensors", copy, out / "job.resolved.toml", out / "events.jsonl"):
        assert path.stat().st_mode & 0o777 == mode, path  # mkstemp's 0600 would hide them from another user


def test_an_unknown_preset_is_named(demo_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["validate", str(demo_dir / "job.toml"), "--preset", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown preset 'no-such-preset'; known: flux1-dev-12gb, ") and "Traceback" not in err
    assert main(["estimate", str(demo_dir / "job.toml"), "--preset", str(tmp_path / "gone.toml")]) == 2
    assert f"--preset: file '{tmp_path / 'gone.toml'}' does not exist" in capsys.readouterr().err
    # a preset of another flavour: its sizes and precisions were chosen for that model
    assert main(["validate", str(demo_dir / "job.toml"), "--preset", "flux2-klein-base-4b-8gb"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --preset flux2-klein-base-4b-8gb: it is for flux2 klein-base-4b, but the job trains flux2 demo; "
        "choose one of its presets (flux2-demo) or set model.flavour")


def test_a_named_preset_applies_under_estimate(demo_dir: Path, capsys) -> None:
    assert main(["estimate", str(demo_dir / "job.toml"), "--preset", "flux2-demo", "--json"]) == 0
    assert '"vram_gib"' in capsys.readouterr().out


@pytest.mark.parametrize(("family", "flavour"), [("flux2", "klein-base-4b"), ("flux1", "schnell")])
def test_training_guidance_is_refused_where_the_flavour_has_no_guidance_embedding(family: str, flavour: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({"model": {"family": family, "flavour": flavour},
                    "advanced": {"guidance_mode": "random", "guidance_max": 6.0}})
    assert "advanced.guidance_mode, advanced.guidance_max: " in str(caught.value)
    assert f"({family} {flavour}) has no guidance embedding, so training guidance would be ignored" in str(caught.value)
    parse_spec({"model": {"family": family, "flavour": flavour}, "advanced": {"guidance_value": 1.0}})  # the default
    parse_spec({"model": {"family": "flux1", "flavour": "dev"}, "advanced": {"guidance_value": 3.5}})


def test_the_cli_and_the_page_agree_on_training_guidance(demo_dir: Path, capsys) -> None:
    from ui import form

    assert main(["validate", str(demo_dir / "job.toml"), "--set", "advanced.guidance_value=3.5"]) == 2
    assert "advanced.guidance_value: FLUX.2 demo (tiny, random weights) (flux2 demo) has no guidance embedding" in \
        capsys.readouterr().err
    # the page greys the controls out for such a flavour: it sends no value the spec would refuse
    values = {"model.family": "flux2", "model.flavour": "klein-base-4b", "advanced.guidance_value": 3.5,
              "advanced.guidance_mode": "random"}
    assert "guidance_value" not in form.values_to_dict(values).get("advanced", {})
    values["model.flavour"] = "dev"
    assert form.values_to_dict(values)["advanced"]["guidance_value"] == 3.5


def test_known_harmless_library_warnings_are_silenced_at_their_source(caplog) -> None:
    import logging

    from trainer.quiet import silence_library_noise

    silence_library_noise()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("a bitsandbytes warning nobody has judged harmless")
    assert [r.getMessage() for r in caplog.records] == ["a bitsandbytes warning nobody has judged harmless"]


def test_a_killed_trainers_last_words_leave_library_warnings_out(capsys) -> None:
    import io
    from collections import deque

    from trainer.runners.child import copy_stderr

    stderr = (
        "W1206 17:51:00.573000 8489 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass\n"
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.\n"
        "/venv/lib/python3.11/site-packages/peft/tuners/lora.py:120: UserWarning: fan_in_fan_out is set to False\n"
        "  warnings.warn(\n"
        "Traceback (most recent call last):\n"
        "  File \"trainer/session.py\", line 300, in step\n"
        "RuntimeError: CUDA error: an illegal memory access was encountered\n"
    )
    tail: deque[str] = deque(maxlen=20)
    copy_stderr(io.BytesIO(stderr.encode()), tail)
    assert list(tail) == ["Traceback (most recent call last):", "  File \"trainer/session.py\", line 300, in step",
                          "RuntimeError: CUDA error: an illegal memory access was encountered"]
    assert capsys.readouterr().err == stderr  # the terminal still shows everything


def test_a_damaged_weight_file_in_the_model_folder_is_named(demo_dir: Path, tmp_path: Path, capsys) -> None:
    import json
    import shutil

    folder = Path(shutil.copytree(demo_dir / "flux2", tmp_path / "flux2"))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 100)  # an interrupted copy: the header survives, the last tensor does not
    index = folder / "vae" / "diffusion_pytorch_model.safetensors.index.json"
    shard = "diffusion_pytorch_model-00002.safetensors"
    index.write_text(json.dumps({"weight_map": {"decoder.conv_in.weight": shard}}))
    job = ["--set", f"model.source='{folder}'", "--set", f"output.dir='{tmp_path / 'out'}'"]
    expected = [
        f"model.source: '{folder / 'transformer' / weights.name}' is damaged (the file is truncated: its tensors "
        f"need {size:,} bytes and it holds {size - 100:,}; download or copy it again)",
        f"model.source: '{folder / 'vae' / 'diffusion_pytorch_model-00002.safetensors'}' is missing (named by "
        f"{index.name}); download or copy the model folder again"]
    for command in ("validate", "train"):
        assert main([command, str(demo_dir / "job.toml"), *job]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 2 and all(line.endswith(text) for line, text in zip(lines, expected, strict=True)), err
    assert not (tmp_path / "out").exists()


def test_the_cli_shows_the_hub_download_and_says_the_base_was_quantised(demo_dir: Path, tmp_path: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fake_hub import FakeHub, serving

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = FakeHub("acme/flux2-demo", demo_dir / "flux2")
    with serving(hub, tmp_path / "cache"):
        code = main(["train", str(demo_dir / "job.toml"), "--no-progress", "--set", "model.source='acme/flux2-demo'",
                     "--set", "model.base_precision='int8'", "--set", "train.max_steps=1", "--set", "sample.prompts=[]",
                     "--set", f"output.dir='{tmp_path / 'out'}'"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    files = len(hub.files())
    lines = [line for line in captured.out.splitlines() if line.startswith("downloading acme/flux2-demo: ")]
    # the text encoders' files come first and the transformer's once they are freed: each download ends whole
    finished = [re.search(r" GB \(100 %\), (\d+)/(\d+) files$", line) for line in lines]
    done = [(int(m[1]), int(m[2])) for m in finished if m]
    assert done and all(got == of for got, of in done) and sum(got for got, _ in done) >= files, captured.out
    assert finished[-1], captured.out  # the last line says the last download is complete
    assert len(lines) <= files + 2 * 11  # a line per file done or tenth of the bytes (per download), not per event
    quantised = [line for line in captured.out.splitlines() if "base transformer quantised to int8" in line]
    assert len(quantised) == 1, captured.out
    before, after = re.findall(r"([\d.]+ [KMG]iB)", quantised[0])
    assert float(after.split()[0]) < float(before.split()[0]) and before.split()[1] == after.split()[1], quantised
