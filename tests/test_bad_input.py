"""The bad-input catalogue (issue #10, point 1): every mistake below is met where a user meets it — the CLI
(`python -m trainer validate|train job.toml`, run in-process) and the app's Studio (Start, Check dataset, Load job)
— and gets one clear message naming the field or file, a non-zero exit without a traceback (the app: a refusal,
and the next good Start works), and nothing the user had (datasets, model and LoRA files, a previous run's
LoRAs and states) is changed or deleted.

Paths with spaces and non-ASCII names must work: such a job validates and trains a step, with a corrupt image in
its dataset skipped with a warning. The session's own handling of a corrupt image among good ones is checked by
tests/test_dataset_run.py::test_a_corrupt_image_among_good_ones_is_skipped_not_fatal.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_ui_state import FakeRunner

from trainer.__main__ import main
from ui.studio import Studio


@dataclass(frozen=True)
class Case:
    """One mistake: the spec keys it sets (values may name a file of `BadFiles` as `{name}`), the key the message
    must name and the words it must say."""

    id: str
    changes: dict[str, Any]
    field: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class BadFiles:
    root: Path  # everything under it is the user's: datasets, model files, LoRAs, a previous run's output
    demo: Path
    previous_run: Path

    def path(self, name: str) -> Path:
        return self.root / name


# ---------------------------------------------------------------------------------------------- fixtures


def _flux1_lora(demo_dir: Path, folder: Path) -> Path:
    """A FLUX.1 LoRA as this trainer writes it (diffusers layout, our metadata), from the FLUX.1 demo model."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from trainer.adapters import add_adapter
    from trainer.checkpoint import save_lora_files

    transformer = FluxTransformer2DModel.from_pretrained(demo_dir / "flux1" / "transformer")
    add_adapter(transformer, "flux1", type="lora", rank=4, alpha=4.0, dropout=0.0, targets="all", init="default")
    metadata = {"family": "flux1", "flavour": "demo", "steps": 10, "trigger_words": [], "base_model": "demo",
                "spec_toml": ""}
    return save_lora_files(transformer, FluxPipeline, folder, "flux1_lora", None, ["diffusers"], metadata)["diffusers"]


@pytest.fixture(scope="module")
def bad(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BadFiles:
    """The broken files and folders of the catalogue, made once; cases only point the job at them."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("users files")
    (root / "empty dataset").mkdir()
    not_images = root / "not images"
    not_images.mkdir()
    (not_images / "notes.txt").write_text("holiday pictures, to sort\n", encoding="utf-8")
    (not_images / "scan.pdf").write_bytes(b"%PDF-1.4 not an image")
    (root / "a file.txt").write_text("a file where a folder is expected\n", encoding="utf-8")
    (root / "a folder.safetensors").mkdir()
    (root / "garbage.safetensors").write_bytes(b"\x00\x01\x02")
    transformer = (demo_dir / "flux2" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(transformer[: len(transformer) // 2])  # an interrupted download
    shutil.copy(demo_dir / "flux2" / "vae" / "diffusion_pytorch_model.safetensors", root / "flux2_vae.safetensors")
    lora = _flux1_lora(demo_dir, root)
    save_file(load_file(lora), root / "flux1_lora_no_metadata.safetensors")  # only its keys tell
    previous = root / "previous run"  # what an earlier run left: LoRAs and training states
    (previous / "state").mkdir(parents=True)
    shutil.copy(lora, previous / "demo_lora.safetensors")
    shutil.copy(lora, previous / "demo_lora-step000002.safetensors")
    (previous / "state" / "step000002.safetensors").write_bytes(b"a training state")
    return BadFiles(root, demo_dir, previous)


@pytest.fixture
def studio(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Studio:
    # every file of the catalogue lies in pytest's temp folder: allowed, as a user would with --allow
    return Studio(FakeRunner(), tmp_path, allowed=[tmp_path_factory.getbasetemp()])


def _snapshot(*roots: Path) -> dict[Path, tuple[str, int]]:
    """Every file under the roots: content hash and modification time."""
    found = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                found[path] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return found


@pytest.fixture
def untouched(bad: BadFiles) -> Iterator[None]:
    """Nothing the user had is changed or deleted (new files, e.g. a failed run's events.jsonl, may appear)."""
    roots = (bad.root, bad.demo / "dataset", bad.demo / "flux2")
    before = _snapshot(*roots)
    yield
    after = _snapshot(*roots)
    changed = [str(path) for path, seen in before.items() if after.get(path) != seen]
    assert changed == [], "changed or deleted: " + ", ".join(changed)


# ---------------------------------------------------------------------------------------------- helpers


def _value(bad: BadFiles, value: Any) -> Any:  # noqa: ANN401 - any spec value
    """`{name}` in a string value is the path of that file of the catalogue."""
    return re.sub(r"\{([^}]*)\}", lambda m: str(bad.path(m.group(1))), value) if isinstance(value, str) else value


def _job_changes(bad: BadFiles, case: Case) -> dict[str, Any]:
    """The case's spec keys over a job that is fine: the shared demo model and dataset, output in a previous run."""
    base = {"data.datasets[0].path": str(bad.demo / "dataset"), "output.dir": str(bad.previous_run),
            "train.max_steps": 1, "sample.prompts": []}
    return base | {key: _value(bad, value) for key, value in case.changes.items()}


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _set_args(changes: dict[str, Any]) -> list[str]:
    args = []
    for key, value in changes.items():
        args += ["--set", f"{key}={json.dumps(value)}"]  # a JSON string or number is a TOML literal too
    return args


def _form(studio: Studio, bad: BadFiles, changes: dict[str, Any]) -> dict[str, Any]:
    values = dict(studio.default_values(), **{"model.source": str(bad.demo / "flux2")})
    for key, value in changes.items():
        if key == "sample.prompts":
            value = " | ".join(value)  # the form's text box
        values["dataset.path" if key == "data.datasets[0].path" else key] = value
    return values


def _assert_one_cli_error(code: int, out: str, err: str, case: Case) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in out + err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"{case.field}: " in lines[0] and all(word in lines[0] for word in case.words), lines[0]


def _assert_studio_refuses_then_starts(studio: Studio, bad: BadFiles, changes: dict[str, Any], case: Case) -> None:
    outcome = studio.start(_form(studio, bad, changes))
    assert not outcome.ok and studio.runner.started == [], outcome
    assert outcome.message == "not started: the files and folders the job names have problems"
    assert len(outcome.problems) == 1, outcome.problems
    assert outcome.problems[0].startswith(f"{case.field}: "), outcome.problems
    assert all(word in outcome.problems[0] for word in case.words), outcome.problems[0]
    fine = _form(studio, bad, _job_changes(bad, Case("fine", {}, "", ())))
    # the previous run's state could be resumed: a Start asks first; a new run, chosen, starts (the app goes on)
    assert "a run stopped at step 2" in studio.start(fine).message and studio.runner.started == []
    assert studio.start(fine, new_run=True).ok and len(studio.runner.started) == 1


# ---------------------------------------------------------------------------------------------- the catalogue

CASES = [
    Case("dataset missing", {"data.datasets[0].path": "{no such folder}"}, "data.datasets[0].path",
         ("no such folder", "does not exist")),
    Case("dataset is a file", {"data.datasets[0].path": "{a file.txt}"}, "data.datasets[0].path",
         ("a file.txt", "is a file", "give the folder")),
    Case("dataset empty", {"data.datasets[0].path": "{empty dataset}"}, "data.datasets[0].path",
         ("no images (.jpg, .jpeg, .png", "empty dataset")),
    Case("dataset of non-images", {"data.datasets[0].path": "{not images}"}, "data.datasets[0].path",
         ("no images (.jpg, .jpeg, .png", "not images")),
    Case("model source missing", {"model.source": "{no model here}"}, "model.source",
         ("no model here", "does not exist")),
    Case("model source is a file", {"model.source": "{a file.txt}"}, "model.source",
         ("a file.txt", "not a diffusers pipeline folder", "model_index.json")),
    Case("model file missing", {"model.transformer": "{flux2.safetensors}"}, "model.transformer",
         ("flux2.safetensors", "does not exist")),
    Case("model file is a folder", {"model.transformer": "{a folder.safetensors}"}, "model.transformer",
         ("a folder.safetensors", "is a folder", "give a .safetensors file")),
    Case("model file corrupt", {"model.transformer": "{garbage.safetensors}"}, "model.transformer",
         ("garbage.safetensors", "not a readable safetensors file", "shorter than a safetensors header")),
    Case("model file truncated", {"model.transformer": "{truncated.safetensors}"}, "model.transformer",
         ("truncated.safetensors", "not a readable safetensors file", "truncated", "download or copy it again")),
    Case("model folder of another flavour", {"model.flavour": "klein-base-4b"}, "model.source",
         ("transformer/config.json' is FLUX.2 demo (tiny, random weights): 2 + 2 blocks, width 128",
          "not FLUX.2 [klein] base 4B", "choose model.flavour = demo")),
    Case("wrong model in slot", {"model.transformer": "{flux2_vae.safetensors}"}, "model.transformer",
         ("flux2_vae.safetensors", "is a VAE", "not the FLUX.2 demo", "it belongs in model.vae")),
    Case("LoRA to continue truncated", {"lora.init_from": "{truncated.safetensors}"}, "lora.init_from",
         ("truncated.safetensors", "not a readable safetensors file", "truncated")),
    Case("LoRA to continue is a folder", {"lora.init_from": "{a folder.safetensors}"}, "lora.init_from",
         ("a folder.safetensors", "is a folder")),
    Case("LoRA of another family (metadata)", {"lora.init_from": "{flux1_lora.safetensors}"}, "lora.init_from",
         ("'flux1_lora.safetensors' is a FLUX.1 LoRA", "flux_lora_studio.family = flux1",
          "this job trains FLUX.2 (model.family = flux2)", "give a FLUX.2 LoRA or clear lora.init_from")),
    Case("LoRA of another family (keys)", {"lora.init_from": "{flux1_lora_no_metadata.safetensors}"},
         "lora.init_from", ("is a FLUX.1 LoRA (its keys are FLUX.1's, e.g. transformer.", "model.family = flux2")),
    Case("output folder not writable", {"output.dir": "{a file.txt}"}, "output.dir",
         ("cannot write to", "a file.txt", "is not a writable folder")),
    Case("output folder inside a file", {"output.dir": "{a file.txt}/run 2"}, "output.dir",
         ("cannot write to", "run 2", "is not a writable folder")),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_cli_names_the_problem_once_and_changes_nothing(case: Case, bad: BadFiles, capsys, untouched) -> None:
    changes = _job_changes(bad, case)
    job = str(bad.demo / "job.toml")
    for command in (["validate", job], ["train", job, "--no-progress"]):
        code, out, err = _cli(capsys, *command, *_set_args(changes))
        _assert_one_cli_error(code, out, err, case)
        assert out == "", out  # refused before any work: nothing else printed


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_studio_start_refuses_with_one_problem_and_stays_usable(case: Case, bad: BadFiles, studio: Studio,
                                                                  untouched) -> None:
    changes = _job_changes(bad, case)
    _assert_studio_refuses_then_starts(studio, bad, changes, case)


LORA_HEADERS = [  # (tensor names, metadata) -> the family it tells, "" when nothing does
    ((), {"ss_base_model_version": "flux1", "ss_network_dim": "16"}, "flux1"),  # kohya sd-scripts
    ((), {"modelspec.architecture": "flux-2-klein-base-9b/lora"}, "flux2"),
    ((), {"ss_base_model_version": "sdxl_base_v1-0"}, "other"),
    (("lora_unet_double_blocks_0_img_mod_lin.lora_down.weight",), {}, "flux1"),  # kohya, no metadata
    (("diffusion_model.single_blocks.3.modulation.lin.lora_A.weight",), {}, "flux1"),  # ComfyUI / BFL
    (("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight",), {}, "flux2"),
    (("transformer.transformer_blocks.0.ff.linear_in.lora_B.weight",), {}, "flux2"),
    (("transformer.transformer_blocks.0.attn.to_q.lora_A.weight",), {}, ""),  # the same in both families
]


@pytest.mark.parametrize(("names", "metadata", "family"), LORA_HEADERS)
def test_the_family_of_a_lora_file_is_told_from_its_metadata_or_keys(names: tuple[str, ...], metadata: dict,
                                                                      family: str, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from trainer.sources.lora_file import check_init_from, lora_family

    path = tmp_path / "lora.safetensors"
    save_file({name: torch.zeros(2, 2) for name in names or ("lora_A.weight",)}, path, metadata=metadata)
    assert lora_family(path)[0] == family
    problem = check_init_from(path, "flux2")
    assert (problem is None) == (family in ("flux2", "")), problem
    if family == "other":
        assert "is a LoRA for another model (not FLUX) (its metadata has ss_base_model_version = sdxl" in problem


# ---------------------------------------------------------------------------------------------- job files

SECTION_AS_VALUE = "train: should be a table of settings ([train] in TOML), not a single value (got 5)"
JOB_FILES = {  # file name -> (its bytes; None: no file, "dir": a folder), what the CLI says, what the app says
    "missing.toml": (None, "file not found; give the path of a job TOML", "file not found; give the path of a job"),
    "a folder.toml": ("dir", "cannot read the file: Is a directory", "cannot read the file: Is a directory"),
    "picture.toml": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file (UTF-8)", "not a text file (UTF-8)"),
    "broken.toml": (b"[lora\nrank = 4\n", "not valid TOML: ", "not valid TOML: "),
    "section as value.toml": (b'train = 5\n[model]\nsource = "x"\n', SECTION_AS_VALUE, SECTION_AS_VALUE),
}


@pytest.mark.parametrize("name", list(JOB_FILES))
def test_a_bad_job_file_is_named_by_the_cli_and_load_job(name: str, tmp_path: Path, studio: Studio, capsys) -> None:
    content, words, app_words = JOB_FILES[name]
    job = tmp_path / name
    if content == "dir":
        job.mkdir()
    elif content is not None:
        job.write_bytes(content)
    for command in ("validate", "train"):
        code, out, err = _cli(capsys, command, str(job))
        assert code == 2 and out == "" and "Traceback" not in err, err
        assert err.startswith(f"error: {job}: {words}") and len(err.strip().splitlines()) == 1, err
    values, _, outcome = studio.load_job(name)
    assert values is None and outcome.message == f"not loaded: {name}"
    assert outcome.problems == [outcome.problems[0]] and outcome.problems[0].startswith(f"{name}: {app_words}")
    assert not job.is_file() or job.read_bytes() == content  # never rewritten


# ---------------------------------------------------------------------------------------------- wrong values

WRONG_VALUES = {  # key -> (value, what the message must say: the rule and the value given)
    "lora.rank": ("sixteen", ("should be a valid integer", "(got 'sixteen')")),
    "train.max_steps": (1.5, ("should be a valid integer", "(got 1.5)")),
    "train.learning_rate": (-1, ("should be greater than 0", "(got -1)")),
    "train.batch_size": (0, ("should be greater than or equal to 1", "(got 0)")),
    "data.caption_dropout": (2, ("should be less than or equal to 1", "(got 2)")),
    "train.optimizer": ("sgd", ("'adamw', 'adamw8bit', 'lion8bit', 'adafactor' or 'prodigy'", "(got 'sgd')")),
}


def _assert_every_wrong_value_named(lines: list[str], prefix: str) -> None:
    assert len(lines) == len(WRONG_VALUES), lines
    for key, (_, words) in WRONG_VALUES.items():
        line = next((line for line in lines if line.startswith(f"{prefix}{key}: ")), None)
        assert line is not None and all(word in line for word in words), (key, lines)


def test_wrong_types_and_ranges_are_all_listed_at_once(bad: BadFiles, studio: Studio, capsys, untouched) -> None:
    wrong = {key: value for key, (value, _) in WRONG_VALUES.items()}
    changes = _job_changes(bad, Case("wrong values", wrong, "", ()))
    job = bad.demo / "job.toml"
    for command in ("validate", "train"):
        code, out, err = _cli(capsys, command, str(job), *_set_args(changes))
        assert code == 2 and out == "" and "Traceback" not in err, err
        _assert_every_wrong_value_named(err.strip().splitlines(), f"error: {job}: ")
    outcome = studio.start(_form(studio, bad, changes))
    assert not outcome.ok and studio.runner.started == []
    _assert_every_wrong_value_named(outcome.problems, "")


# ---------------------------------------------------------------------------------------------- non-images


def test_files_named_as_images_that_are_not_will_not_train(bad: BadFiles, tmp_path: Path, studio: Studio, capsys,
                                                           untouched) -> None:
    dataset = tmp_path / "renamed files"
    dataset.mkdir()
    (dataset / "photo 1.png").write_text("not a picture", encoding="utf-8")
    (dataset / "photo 2.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header and nothing else")
    before = _snapshot(dataset)
    changes = _job_changes(bad, Case("renamed files", {"data.datasets[0].path": str(dataset)}, "", ()))
    job = str(bad.demo / "job.toml")
    code, out, err = _cli(capsys, "validate", job, *_set_args(changes))
    assert code == 2 and "Traceback" not in out + err
    assert err == f"error: {job}: the dataset cannot train; see the table above\n"
    assert "dataset health: will not train" in out and "photo 1.png" in out and "photo 2.jpg" in out
    assert out.count("cannot read this image") == 2
    code, out, err = _cli(capsys, "train", job, "--no-progress", *_set_args(changes))
    assert code == 2 and "Traceback" not in out + err, err
    assert err.startswith("error: the dataset cannot train:\nerror: dataset health: will not train"), err
    assert "photo 1.png" in err and "the dataset cannot train" not in out  # said once, on stderr
    check = studio.check_dataset(_form(studio, bad, changes))
    assert check.verdict == "will not train" and "photo 1.png" in check.details
    assert _snapshot(dataset) == before


# ---------------------------------------------------------------------------------------------- unreadable paths


def _chmod_stops_reading(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        probe.read_text()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()


UNREADABLE = [  # the spec key, what is made unreadable (a copy of the demo's transformer file, or a folder)
    Case("dataset folder", {"data.datasets[0].path": "dataset"}, "data.datasets[0].path",
         ("cannot read folder", "permission denied")),
    Case("model source folder", {"model.source": "model"}, "model.source", ("cannot read folder", "permission denied")),
    Case("model file", {"model.transformer": "transformer.safetensors"}, "model.transformer",
         ("not a readable safetensors file", "Permission denied")),
    Case("LoRA to continue", {"lora.init_from": "lora.safetensors"}, "lora.init_from",
         ("not a readable safetensors file", "Permission denied")),
    Case("output folder", {"output.dir": "output"}, "output.dir", ("cannot write to", "is not a writable folder")),
]


@pytest.mark.parametrize("case", UNREADABLE, ids=[case.id for case in UNREADABLE])
def test_unreadable_paths_are_named(case: Case, bad: BadFiles, tmp_path: Path, studio: Studio, capsys) -> None:
    if not _chmod_stops_reading(tmp_path):
        pytest.skip("chmod 000 does not stop this user reading (root, or CAP_DAC_OVERRIDE): the cases of a file "
                    "where a folder is expected, and the reverse, stand in for unreadable paths")
    key, name = next(iter(case.changes.items()))
    target = tmp_path / name
    if name.endswith(".safetensors"):
        shutil.copy(bad.demo / "flux2" / "transformer" / "diffusion_pytorch_model.safetensors", target)
    else:
        shutil.copytree(bad.demo / ("flux2" if name == "model" else "dataset"), target)
    changes = _job_changes(bad, Case(case.id, {key: str(target)}, "", ()))
    before = _snapshot(target)
    target.chmod(0o555 if key == "output.dir" else 0)
    try:
        job = str(bad.demo / "job.toml")
        for command in (["validate", job], ["train", job, "--no-progress"]):
            code, out, err = _cli(capsys, *command, *_set_args(changes))
            _assert_one_cli_error(code, out, err, case)
        _assert_studio_refuses_then_starts(studio, bad, changes, case)
        if key == "data.datasets[0].path":
            check = studio.check_dataset(_form(studio, bad, changes))
            assert check.verdict == "will not train" and "cannot read this folder" in check.details
    finally:
        target.chmod(0o755)
    assert _snapshot(target) == before  # still there, every file as it was


def test_an_unreadable_job_file_is_named(tmp_path: Path, studio: Studio, capsys) -> None:
    if not _chmod_stops_reading(tmp_path):
        pytest.skip("chmod 000 does not stop this user reading (root, or CAP_DAC_OVERRIDE): a folder given as the "
                    "job file stands in (test_a_bad_job_file_is_named_by_the_cli_and_load_job)")
    job = tmp_path / "job.toml"
    job.write_text("[lora]\nrank = 4\n", encoding="utf-8")
    job.chmod(0)
    try:
        code, out, err = _cli(capsys, "validate", str(job))
        assert code == 2 and out == "" and err == f"error: {job}: cannot read the file: Permission denied\n"
        values, _, outcome = studio.load_job("job.toml")
        assert values is None and outcome.problems == ["job.toml: cannot read the file: Permission denied"]
    finally:
        job.chmod(0o644)
    assert job.read_text(encoding="utf-8") == "[lora]\nrank = 4\n"


# ---------------------------------------------------------------------------------------------- paths that must work


def test_spaces_and_non_ascii_paths_validate_and_train(demo_dir: Path, tmp_path: Path, studio: Studio,
                                                       capsys) -> None:
    """Model, dataset, output and the job file named with spaces, accents, CJK and an apostrophe; a corrupt
    image in the dataset is skipped with a warning naming it, and kept."""
    root = tmp_path / "Mes projets d'été ✓"
    shutil.copytree(demo_dir / "flux2", root / "modèles FLUX" / "démo 日本")
    dataset = root / "données photos 写真"
    shutil.copytree(demo_dir / "dataset", dataset)
    good = (dataset / "shape_00.png").read_bytes()
    (dataset / "cassé à moitié.png").write_bytes(good[: len(good) // 2])  # truncated mid-file
    job = tmp_path / "mon job n°1.toml"  # in the app's workdir: its relative paths mean the same to the app
    text = (demo_dir / "job.toml").read_text(encoding="utf-8")
    for old, new in (('source = "flux2"', f'source = "{root.name}/modèles FLUX/démo 日本"'),
                     ('path = "dataset"', f'path = "{root.name}/{dataset.name}"'),
                     ('dir = "output"', f'dir = "{root.name}/sortie à moi"')):
        assert old in text
        text = text.replace(old, new)
    job.write_text(text, encoding="utf-8")
    before = _snapshot(root)

    code, out, err = _cli(capsys, "validate", str(job))
    assert code == 0 and err == "", err
    assert f"ok: {job} is valid" in out and "cassé à moitié.png" in out
    code, out, err = _cli(capsys, "train", str(job), "--set", "train.max_steps=1", "--set", "sample.prompts=[]",
                          "--no-progress")
    assert code == 0 and "Traceback" not in err, err
    assert "warning: dataset check:" in out and "cassé à moitié.png" in out
    assert "run completed at step 1" in out
    assert (root / "sortie à moi" / "demo_lora.safetensors").is_file()
    assert {path: seen for path, seen in _snapshot(root).items() if path in before} == before

    values, _, outcome = studio.load_job(job.name)
    assert outcome.ok, outcome.problems
    assert studio.start(values).ok and studio.runner.started[0][0].data.datasets[0].path == str(dataset)
