"""The headless CLI as a user runs it: exit codes, one clear line per problem, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, python_env

from trainer.__main__ import main
from trainer.demo import sample_prompts


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=python_env(),
                          capture_output=True, text=True, timeout=300)


def test_demo_command_builds_a_trainable_job(tmp_path: Path, capsys) -> None:
    # Only test_train_runs_the_demo_headless runs `python -m trainer` itself; the others call its main() (a
    # subprocess costs ~5-10 s of imports each)
    assert main(["demo", "--out", str(tmp_path / "my demo"), "--family", "flux2"]) == 0, capsys.readouterr().err
    job = tmp_path / "my demo" / "job.toml"
    assert job.is_file()
    assert (tmp_path / "my demo" / "flux2" / "model_index.json").is_file()
    images = sorted((tmp_path / "my demo" / "dataset").glob("*.png"))
    assert len(images) >= 8
    assert all(image.with_suffix(".txt").read_text().strip() for image in images)


def test_train_runs_the_demo_headless(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run("train", str(demo_dir / "job.toml"), "--set", "train.max_steps=4", "--set", "sample.every_steps=2",
                  "--set", f"output.dir='{out}'", "--set", "output.name=cli_lora")
    assert result.returncode == 0, result.stderr
    assert (out / "cli_lora.safetensors").is_file()
    assert (out / "job.resolved.toml").is_file()
    # each of the demo job's prompts at steps 0 (baseline), 2 and 4
    assert len(list((out / "samples").glob("*.png"))) == 3 * len(sample_prompts())
    kinds = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished" and kinds.count("progress") == 4
    assert "run completed at step 4" in result.stdout
    assert "4/4" in result.stderr  # the progress bar


def test_bad_values_give_one_line_each_and_no_traceback(demo_dir: Path, capsys) -> None:
    assert main(["train", str(demo_dir / "job.toml"), "--set", "lora.rank=0", "--set", "train.lerning_rate=1"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert any("lora.rank" in line and "greater than or equal to 1" in line for line in lines)
    assert any("train.lerning_rate: unknown key; did you mean 'learning_rate'?" in line for line in lines)
    assert all(line.startswith(f"error: {demo_dir / 'job.toml'}") for line in lines)
    assert "Traceback" not in err


def test_missing_dataset_folder_is_named(demo_dir: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no such folder"
    assert main(["train", str(demo_dir / "job.toml"), "--set", f"data.datasets=[{{path='{missing}'}}]"]) == 2
    assert capsys.readouterr().err.strip() == f"error: data.datasets[0].path: folder '{missing}' does not exist"


def test_validate_checks_files_and_debug_shows_traceback(demo_dir: Path, tmp_path: Path, capsys) -> None:
    # in-process: the commands above run `python -m trainer` itself; a subprocess here cost ~10 s of imports
    assert main(["validate", str(demo_dir / "job.toml")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("dataset health: ok — 12 images in 1 dataset"), err
    assert "64x64   1:1         12            12" in out  # the bucket plan
    assert f"ok: {demo_dir / 'job.toml'} is valid" in out
    assert "lora.targets 'all' hits 28 modules (presets: all 28, attention 20, mlp 8, tiny 6)" in out
    assert main(["validate", str(demo_dir / "job.toml"), "--set", f"model.source='{tmp_path}'", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "model.source" in err and "no model_index.json" in err
    assert "Traceback" in err


def test_resume_continues_from_the_latest_state(demo_dir: Path, tmp_path: Path, capsys) -> None:
    common = ["--set", f"output.dir='{tmp_path}'", "--set", "sample.prompts=[]", "--no-progress"]
    assert main(["train", str(demo_dir / "job.toml"), "--set", "train.max_steps=2", *common]) == 0
    capsys.readouterr()
    assert main(["train", str(demo_dir / "job.toml"), "--set", "train.max_steps=4", "--resume", *common]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step000002.safetensors at step 2" in out
    assert "run completed at step 4" in out
    progress = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in progress if e["event"] == "progress"] == [1, 2, 3, 4]


def test_estimate_prints_one_json_object_without_loading_a_model(demo_dir: Path, capsys) -> None:
    assert main(["estimate", str(demo_dir / "job.toml"), "--set", "model.flavour=klein-base-9b",
                 "--set", "model.source=''", "--gpu-vram", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"vram_gib", "ram_gib", "phases", "breakdown", "verdict", "suggestion"} <= report.keys()
    assert report["verdict"] == "will not fit" and report["phases"]["training step"]["vram_gib"] > 8
