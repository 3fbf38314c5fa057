"""The app uses only the folders it was given: `../`, absolute paths elsewhere and links that lead out are refused
with a message naming the allowed folders, in every handler that takes a path (no gradio needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from test_ui_state import FakeRunner

from trainer.folders import ADD_A_FOLDER, Folders, PathRefused, spec_paths
from trainer.spec import parse_spec
from ui import caption_editor, form, presets
from ui.run_state import RunView, Sample
from ui.run_tab import gallery_items
from ui.sample_compare import compare_html
from ui.studio import Studio


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """workdir and an allowed folder with images; a secret folder beside them; links from inside to outside."""
    workdir, allowed, secret = tmp_path / "work", tmp_path / "allowed", tmp_path / "secret"
    for folder in (workdir, allowed / "images", secret):
        folder.mkdir(parents=True)
    for folder in (allowed / "images", secret):
        for index in range(2):
            Image.new("RGB", (64, 64), (index * 90, 40, 40)).save(folder / f"img_{index}.png")
            (folder / f"img_{index}.txt").write_text(f"caption {index}\n", encoding="utf-8")
    (secret / "job.toml").write_text("[lora]\nrank = 8\n", encoding="utf-8")
    os.symlink(secret, allowed / "link_out")  # a link inside an allowed folder that leads out of it
    os.symlink(secret / "job.toml", workdir / "linked_job.toml")
    return {"workdir": workdir, "allowed": allowed, "secret": secret}


@pytest.fixture
def studio(layout: dict[str, Path]) -> Studio:
    return Studio(FakeRunner(), layout["workdir"], allowed=[layout["allowed"]])


def outside_paths(layout: dict[str, Path]) -> list[str]:
    """The ways out: ../ from the workdir and from an allowed folder, an absolute path, a link."""
    return ["../secret", str(layout["allowed"] / ".." / "secret"), str(layout["secret"]),
            str(layout["allowed"] / "link_out")]


def test_folders_resolve_dotdot_and_links_before_judging(layout):
    folders = Folders.of(layout["workdir"], [layout["allowed"]])
    assert folders.check("sub/../jobs", "folder") == (layout["workdir"] / "jobs").resolve()
    assert folders.check(layout["allowed"] / "images", "image folder") == (layout["allowed"] / "images").resolve()
    for path in outside_paths(layout):
        with pytest.raises(PathRefused) as refused:
            folders.check(path, "image folder")
        message = str(refused.value)
        assert message.startswith(f"refused: the image folder {path!r}")
        assert str(layout["workdir"].resolve()) in message and str(layout["allowed"].resolve()) in message
        assert ADD_A_FOLDER in message
    assert "it leads to" in str(pytest.raises(PathRefused, folders.check, layout["allowed"] / "link_out", "x").value)


def test_every_path_of_a_job_is_listed(tmp_path):
    spec = parse_spec({"model": {"family": "flux2", "flavour": "demo", "source": "/models/demo"},
                       "data": {"datasets": [{"path": "/a", "masks": "/m"}, {"path": "/b", "conditioning": "/r"}],
                                "cache_dir": "/c"},
                       "sample": {"prompt_library": "/p.toml", "prompts": ["x", "y"],
                                  "reference_images": ["/s0.png", "/s1.png"], "clip_score_model": "/clip",
                                  "preview_decoder": "/taef1"},
                       "lora": {"init_from": "/l.safetensors"}, "output": {"dir": "/o", "comfy_lora_dir": "/comfy"}})
    assert dict(spec_paths(spec)) == {
        "model.source": "/models/demo", "data.datasets[0].path": "/a", "data.datasets[0].masks": "/m",
        "data.datasets[1].path": "/b", "data.datasets[1].conditioning": "/r", "data.cache_dir": "/c",
        "sample.prompt_library": "/p.toml", "sample.reference_images[0]": "/s0.png",
        "sample.reference_images[1]": "/s1.png", "lora.init_from": "/l.safetensors", "output.comfy_lora_dir": "/comfy",
        "output.dir": "/o", "sample.clip_score_model": "/clip", "sample.preview_decoder": "/taef1"}
    hub = parse_spec({"model": {"family": "flux2", "flavour": "klein-base-4b",
                                "source": "black-forest-labs/FLUX.2-klein-base-4B"},
                      "data": {"datasets": [{"path": "/a"}]},
                      "sample": {"clip_score_model": "openai/clip-vit-base-patch32",
                                 "preview_decoder": "madebyollin/taef1"}})
    assert not {"model.source", "sample.clip_score_model", "sample.preview_decoder"} & set(dict(spec_paths(hub)))


def test_start_refuses_a_job_with_a_path_outside(studio, layout):
    values = studio.default_values()
    for key, path in [("dataset.path", "../secret"), ("output.dir", str(layout["secret"] / "out")),
                      ("dataset.path", str(layout["allowed"] / "link_out")), ("lora.init_from", "/etc/passwd"),
                      ("dataset.conditioning", str(layout["secret"])),  # edit pairs' references
                      ("sample.reference_images", str(layout["secret"] / "img_0.png"))]:
        outcome = studio.start(dict(values, **{key: path}))
        assert outcome.message == "not started: a path is outside the folders this app may use", (key, outcome)
        assert any("refused:" in problem and ADD_A_FOLDER in problem for problem in outcome.problems)
    assert studio.runner.started == []
    inside = dict(values, **{"output.dir": str(layout["allowed"] / "out")})
    assert studio.start(inside).ok  # the demo in the workdir, the output in an allowed folder


def test_dataset_check_and_caption_editor_refuse_outside_folders(studio, layout):
    values = studio.default_values()
    for path in outside_paths(layout):
        check = studio.check_dataset(dict(values, **{"dataset.path": path}))
        assert check.verdict == "will not train" and "outside the folders" in check.line
        assert "refused: the data.datasets[0].path" in check.details and "img_0" not in check.details
        state, outcome = studio.load_captions(path)
        assert not outcome.ok and outcome.problems[0].startswith("refused: the data.datasets[0].path")
        assert state["names"] == []
        pairs = studio.check_dataset(dict(values, **{"dataset.path": str(layout["allowed"] / "images"),
                                                     "dataset.conditioning": path}))
        assert pairs.verdict == "will not train" and "refused: the data.datasets[0].conditioning" in pairs.details
        assert "img_0" not in pairs.details
    state, outcome = studio.load_captions(str(layout["allowed"] / "images"))
    assert outcome.ok and state["names"] == ["img_0.png", "img_1.png"]

    forged = dict(caption_editor.empty_state(), folder=str(layout["secret"].resolve()), names=["img_0.png"],
                  captions=["changed"], originals=["caption 0"])
    _, outcome = studio.save_captions(forged)  # a state naming another folder is never written
    assert not outcome.ok and (layout["secret"] / "img_0.txt").read_text(encoding="utf-8") == "caption 0\n"


def test_captioning_refuses_outside_folders(studio, layout):
    outcome = studio.caption_start("../secret", "blip", None)
    assert not outcome.ok and outcome.problems[0].startswith("refused: the data.datasets[0].path '../secret'")
    outcome = studio.caption_start(str(layout["allowed"] / "images"), "blip", str(layout["secret"]))
    assert not outcome.ok and outcome.problems[0].startswith(
        "refused: the model folder of Model source (Automatic captions, caption_source)")
    assert not studio.captioning.running


def test_job_files_are_read_and_written_only_inside(studio, layout):
    for path in [*outside_paths(layout), "../secret/job.toml", str(layout["secret"] / "job.toml"),
                 "linked_job.toml"]:
        values, hidden, outcome = studio.load_job(path)
        assert values is None and outcome.problems[0].startswith("refused: the job file"), path
    for path in [*outside_paths(layout), str(layout["secret"] / "new.toml"), "linked_job.toml"]:
        saved, outcome = studio.save_job(studio.default_values(), path=path)  # the link: no writing through it
        assert saved is None and outcome.problems[0].startswith("refused: the job file"), path
    assert sorted(p.name for p in layout["secret"].iterdir()) == ["img_0.png", "img_0.txt", "img_1.png",
                                                                 "img_1.txt", "job.toml"]
    saved, outcome = studio.save_job(studio.default_values(), path=str(layout["allowed"] / "notes.txt"))
    assert saved is None and "ends in .toml" in outcome.message  # never another kind of file, even inside


def test_resume_offer_and_gallery_stay_inside(studio, layout):
    (layout["secret"] / "state").mkdir()
    (layout["secret"] / "state" / "step000002.safetensors").write_bytes(b"")
    assert studio.resume_offer(str(layout["secret"]), 10) == ""
    view = RunView()
    view.samples = [Sample(1, str(layout["secret"] / "img_0.png"), "outside"),
                    Sample(2, str(layout["allowed"] / "images" / "img_1.png"), "inside")]
    items = gallery_items(view, [], studio.folders)
    assert [label for _, label in items] == ["step 2: inside"]


def test_step_zero_beside_the_latest_sample_of_each_prompt_stays_inside(studio, layout):
    images = layout["allowed"] / "images"
    view = RunView()
    view.samples = [Sample(0, str(images / "img_0.png"), "a red circle"), Sample(0, str(images / "img_1.png"), "new"),
                    Sample(5, str(images / "img_1.png"), "a red circle"), Sample(9, str(images / "img_0.png"),
                                                                                 "a red circle"),
                    Sample(0, str(layout["secret"] / "img_0.png"), "outside")]
    assert [(a.step, b.step) for a, b in view.first_and_latest()] == [(0, 9), (0, 0), (0, 0)]
    page = compare_html(view, [], studio.folders)
    rows = page.split("a red circle")[1].split("new")
    assert "step 0" in rows[0] and "step 9" in rows[0] and "step 5" not in rows[0]
    assert "the next sample goes here" in rows[1]  # one sample so far: its place beside it is kept
    assert page.count("data:image/png;base64,") == 3 and "(not readable)" in page  # the secret one is not sent


def test_a_preset_is_named_never_a_path(tmp_path):
    values = form.spec_to_values(parse_spec(form.default_job(tmp_path)))
    filled = presets.fill(values, None, values, None, "../hardware_profiles/cpu-only", tmp_path)
    assert not filled.ok and filled.message == "not applied: unknown preset '../hardware_profiles/cpu-only'"


# ---------------------------------------------------------------------- every endpoint that writes (issue 22, point 1)

HOSTILE_NAMES = ["/tmp/victim/x", "../../../../../../tmp/victim/lora", "..", "C:victim", "a\\..\\b", "x\ny"]


def _starts(studio: Studio) -> dict[str, object]:
    """Every button that hands a form's job to a trainer, as its handler calls Studio (multi-GPU included)."""
    from trainer.runners.app import AppRunner
    from ui.multi_gpu import Choice
    from ui.multi_gpu import start as start_processes

    studio.runner = AppRunner(studio.runner)
    return {"start": studio.start, "resume": lambda values: studio.start(values, resume=True),
            "train_steps": lambda values: studio.train_steps(values, 2),
            "multi_gpu_start": lambda values: start_processes(studio, values, None, Choice(("cpu",), 2))}


def _untouched(layout: dict[str, Path]) -> list[str]:
    return sorted(str(p.relative_to(layout["secret"])) for p in layout["secret"].rglob("*"))


def test_every_writing_endpoint_refuses_absolute_dotdot_and_linked_targets(studio, layout, tmp_path):
    secret_before = _untouched(layout)
    values = dict(studio.default_values(), **{"output.dir": str(layout["allowed"] / "out")})
    inside = layout["allowed"] / "out"
    inside.mkdir()
    os.symlink(layout["secret"], inside / "samples")  # a run's subfolder that leads out
    os.symlink(layout["secret"] / "job.toml", layout["allowed"] / "events.jsonl")  # appended to by every run
    os.symlink(layout["secret"], layout["workdir"] / "cache_link")
    hostile = [("output.name", name) for name in HOSTILE_NAMES]
    hostile += [("output.dir", "../secret"), ("output.dir", str(layout["secret"] / "out")),
                ("output.dir", str(layout["allowed"] / "link_out" / "out")), ("output.dir", str(inside)),
                ("output.dir", str(layout["allowed"])),  # its events.jsonl leads out
                ("data.cache_dir", "../secret/cache"), ("data.cache_dir", "cache_link"),
                ("output.comfy_lora_dir", str(layout["allowed"] / "link_out"))]
    for endpoint, call in _starts(studio).items():
        for key, path in hostile:
            outcome = call(dict(values, **{key: path}))
            assert not outcome.ok and outcome.message.startswith("not "), (endpoint, key, path, outcome)
            said = "\n".join(outcome.problems)
            assert (f"{key}: " in said and "a name is not a path" in said or "holds" in said) if key == "output.name" \
                else ("refused:" in said and ADD_A_FOLDER in said), (endpoint, key, path, said)
    assert studio.runner.training.started == []

    for name in HOSTILE_NAMES:  # Save job with no path typed names the file after output.name
        saved, outcome = studio.save_job(dict(values, **{"output.name": name}))
        assert saved is None and any(p.startswith("output.name: ") for p in outcome.problems), (name, outcome)
    (layout["workdir"] / ".studio").mkdir(exist_ok=True)
    os.symlink(layout["secret"], layout["workdir"] / ".studio" / "jobs")  # the default jobs folder leads out
    saved, outcome = studio.save_job(values)
    assert saved is None and outcome.problems[0].startswith("refused: the job file"), outcome
    assert _untouched(layout) == secret_before
    assert not Path("/tmp/victim").exists() or not any(Path("/tmp/victim").iterdir())

    (layout["workdir"] / ".studio" / "jobs").unlink()
    saved, outcome = studio.save_job(values)  # and a plain name inside still works
    assert outcome.ok and saved == layout["workdir"] / ".studio" / "jobs" / "demo_lora.toml"
    safe = dict(values, **{"output.dir": str(layout["allowed"] / "fresh"), "output.name": "my lora v2"})
    assert studio.start(safe).ok
