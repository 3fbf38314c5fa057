"""The Dataset & Captioning tab without a browser: the new data keys in the form, the dataset check (health and
buckets), the captioning job (a tiny BLIP built offline, as tests/test_captioners.py does) and the caption
editor's files."""

from __future__ import annotations

import threading
import time
import tomllib
from pathlib import Path

import pytest
from PIL import Image
from test_captioners import build_blip, make_images, sidecar
from test_ui_state import FakeRunner

from trainer.data.captioners import caption_dataset
from trainer.demo import edit_job_toml
from trainer.runners.caption import CaptionRunner
from trainer.spec import parse_spec, resolve_paths
from ui import caption_editor, edit_pairs, form
from ui.studio import CAPTIONING_IN_PROGRESS, Studio

# ---------------------------------------------------------------------- the form's new data keys

DATA_KEYS = {
    "data.resolution": "512, 768", "data.bucket_step": 32, "data.max_upscale": 1.5, "data.min_size": 256,
    "dataset.crop": "random", "data.cache_latents": "disk", "data.cache_text_embeddings": "disk",
    "data.cache_dir": "/caches/demo",
}


@pytest.fixture
def studio(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Studio:
    # The module's captioning model lives in a temp folder of its own: allowed as the user would with --allow.
    return Studio(FakeRunner(), tmp_path, allowed=[tmp_path_factory.getbasetemp()])


def test_new_data_keys_are_form_keys_with_the_demo_defaults(studio, tmp_path):
    assert set(DATA_KEYS) <= set(form.FORM_KEYS)
    defaults = studio.default_values()
    assert {key: defaults[key] for key in DATA_KEYS} == {
        "data.resolution": "64", "data.bucket_step": 64, "data.max_upscale": 1.0, "data.min_size": 0,
        "dataset.crop": "center", "data.cache_latents": "memory", "data.cache_text_embeddings": "memory",
        "data.cache_dir": ""}
    assert form.form_to_spec(defaults) == parse_spec(form.default_job(tmp_path))


def test_new_data_keys_map_to_the_spec_and_back(studio):
    values = dict(studio.default_values(), **DATA_KEYS)
    spec = form.form_to_spec(values)
    data = spec.data
    assert data.resolution == [512, 768] and data.resolutions(data.datasets[0]) == (512, 768)
    assert (data.bucket_step, data.max_upscale, data.min_size) == (32, 1.5, 256)
    assert (data.cache_latents, data.cache_text_embeddings, data.cache_dir) == ("disk", "disk", "/caches/demo")
    assert data.datasets[0].crop == "random"
    assert form.spec_to_values(spec) == values
    assert form.form_to_spec(dict(values, **{"data.resolution": " 1024 "})).data.resolution == 1024


def test_new_data_keys_round_trip_through_a_toml_job(studio):
    values = dict(studio.default_values(), **DATA_KEYS)
    path, outcome = studio.save_job(values)
    assert outcome.ok, outcome.problems
    text = path.read_text(encoding="utf-8")
    assert "resolution = [\n    512,\n    768,\n]" in text or "resolution = [512, 768]" in text
    loaded, hidden, outcome = studio.load_job(path)
    assert outcome.ok and loaded == values
    assert form.form_to_spec(loaded, hidden) == form.form_to_spec(values)


@pytest.mark.parametrize(("text", "expected"), [
    ("1024", 1024), ("512, 768, 1024", [512, 768, 1024]), ("[512,768]", [512, 768]), (" 512  768 ", [512, 768]),
    (1024, 1024), (1024.0, 1024), ([512, 768], [512, 768]),
])
def test_resolution_text_is_read_as_one_size_or_several(text, expected):
    assert form.parse_resolution(text) == expected
    assert form.format_resolution(expected) == (str(expected) if isinstance(expected, int)
                                                else ", ".join(map(str, expected)))


@pytest.mark.parametrize(("text", "problem"), [
    ("512, big", "data.resolution: 'big' is not a whole number of pixels"),
    ("", "data.resolution: empty"),
    ("100", "data.resolution: 100 must be between 64 and 4096 and a multiple of bucket_step"),
])
def test_a_bad_resolution_reaches_the_problems_box(tmp_path, text, problem):
    runner = FakeRunner()
    studio = Studio(runner, tmp_path)
    outcome = studio.start(dict(studio.default_values(), **{"data.resolution": text, "lora.rank": 0}))
    assert not outcome.ok and runner.started == []
    assert any(p.startswith(problem) for p in outcome.problems), outcome.problems
    assert any(p.startswith("lora.rank") for p in outcome.problems)  # every problem at once


# ---------------------------------------------------------------------- check dataset


def images_with_captions(folder: Path, count: int = 3, size: tuple[int, int] = (64, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img_{index:02d}.png"
        Image.new("RGB", size, (40 * index, 90, 200)).save(path)
        path.with_suffix(".txt").write_text(f"a picture number {index}\n", encoding="utf-8")
        paths.append(path)
    return paths


def checked(studio: Studio, folder: Path, **changes):
    values = dict(studio.default_values(), **{"dataset.path": str(folder)}, **changes)
    return studio.check_dataset(values)


def test_check_ok_shows_the_verdict_health_and_bucket_plan(studio, tmp_path):
    images_with_captions(tmp_path / "data", 4)
    result = checked(studio, tmp_path / "data")
    assert result.verdict == "ok"
    assert result.line == "ok — 4 images in 1 dataset: 4 usable, 0 skipped, 4 samples with repeats"
    assert "**Dataset health: ok**" in result.details
    assert "`img_00.png`: shapez a picture number 0" in result.details  # as training reads it, trigger added
    assert result.buckets.startswith("Buckets: 1 for 4 samples per epoch (step 64")
    assert "64x64" in result.buckets


def test_check_warns_about_an_unreadable_file(studio, tmp_path):
    images_with_captions(tmp_path / "data", 3)
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = checked(studio, tmp_path / "data")
    assert result.verdict == "warnings" and result.line.startswith("warnings — 4 images in 1 dataset: 3 usable, 1 "
                                                                   "skipped")
    assert "broken.png" in result.details and "skipped" in result.details
    assert "resolution 64: 3 images" in result.buckets


def test_check_of_an_empty_or_missing_folder_will_not_train(studio, tmp_path):
    (tmp_path / "empty").mkdir()
    result = checked(studio, tmp_path / "empty")
    assert result.verdict == "will not train" and result.line.startswith("will not train — 0 images")
    assert "no images" in result.details and result.buckets == ""
    result = checked(studio, tmp_path / "nowhere")
    assert result.verdict == "will not train" and "does not exist" in result.details


def test_check_of_images_no_bucket_takes_will_not_train(studio, tmp_path):
    images_with_captions(tmp_path / "data", 2, size=(32, 32))  # the smallest bucket is 64x64: 2x enlarged
    result = checked(studio, tmp_path / "data")
    assert result.verdict == "will not train" and "No image fits any bucket" in result.details
    assert "too small" in result.buckets


def test_check_names_form_problems_and_the_unbuilt_demo(studio, tmp_path):
    result = studio.check_dataset(studio.default_values())
    assert result.verdict == "not built" and "built on the first Start" in result.details
    result = checked(studio, tmp_path, **{"data.resolution": "64, huge"})
    assert result.line.startswith("will not train — the form has problems")
    assert "data.resolution: 'huge' is not a whole number" in result.details


# ---------------------------------------------------------------------- edit pairs


def edit_pair_values(studio: Studio, tmp_path: Path) -> dict:
    return dict(studio.default_values(), **{
        "dataset.path": str(tmp_path / "after"), "dataset.conditioning": str(tmp_path / "before"),
        "dataset.conditioning_match": "loose", "sample.prompts": "make it red | make it blue",
        "sample.reference_images": f"{tmp_path / 'a.png'} | {tmp_path / 'b.png'}"})


def test_edit_pair_keys_map_to_the_spec_and_round_trip_through_a_toml_job(studio, tmp_path):
    defaults = studio.default_values()
    assert (defaults["dataset.conditioning"], defaults["dataset.conditioning_match"],
            defaults["sample.reference_images"]) == ("", "strict", "")  # no pairs; the radio shows the default
    values = edit_pair_values(studio, tmp_path)
    spec = form.form_to_spec(values)
    entry = spec.data.datasets[0]
    assert (entry.conditioning, entry.conditioning_match) == (str(tmp_path / "before"), "loose")
    assert spec.sample.reference_images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert form.spec_to_values(spec) == values
    path, outcome = studio.save_job(values)
    assert outcome.ok, outcome.problems
    loaded, hidden, outcome = studio.load_job(path)
    assert outcome.ok and loaded == values and form.form_to_spec(loaded, hidden) == spec
    # an empty reference folder means no pairs: the crop choice goes too, even the loaded job's
    cleared = form.form_to_spec(dict(loaded, **{"dataset.conditioning": " ", "sample.reference_images": ""}), hidden)
    assert (cleared.data.datasets[0].conditioning, cleared.data.datasets[0].conditioning_match) == (None, None)
    assert "conditioning" not in studio.save_job(dict(loaded, **{"dataset.conditioning": ""}))[0].read_text()
    # the demo's edit job names no crop: the form shows strict, and the job it makes trains the same pairs
    demo = resolve_paths(parse_spec(tomllib.loads(edit_job_toml())), tmp_path)  # its text: no need to build it
    shown = form.spec_to_values(demo)
    assert shown["dataset.conditioning"] == str(tmp_path / "dataset_edit_ref")
    assert shown["dataset.conditioning_match"] == "strict" and shown["sample.reference_images"] == ""
    again = form.form_to_spec(shown, form.hidden_fields(demo)).data.datasets[0]
    assert (again.conditioning, again.match) == (demo.data.datasets[0].conditioning, "strict")


@pytest.mark.parametrize(("family", "flavour", "takes"), [
    ("flux2", "demo", True), ("flux2", "klein-base-4b", True), ("flux1", "kontext", True), ("flux1", "dev", False),
    ("flux1", "schnell", False), ("flux1", "nonsense", False)])
def test_edit_pair_controls_show_for_flavours_that_take_references(family, flavour, takes):
    shown = edit_pairs.edit_controls(family, flavour)
    assert (shown.takes_references, shown.show_pairs, shown.show_sample_references) == (takes, takes, takes)
    assert ("takes no reference image" in shown.note) != takes
    assert edit_pairs.takes_references(family, flavour) == registry_takes(family, flavour)


def registry_takes(family: str, flavour: str) -> bool:
    from trainer import registry

    return flavour in registry.flavour_names(family) and registry.get_flavour(family, flavour).reference_images


def test_edit_pair_controls_that_hold_a_value_stay_visible_with_what_to_clear():
    shown = edit_pairs.edit_controls("flux1", "dev", "/refs", "")
    assert (shown.show_pairs, shown.show_sample_references) == (True, False)
    assert shown.note.endswith("Clear the reference folder, or the job will not start.")
    shown = edit_pairs.edit_controls("flux1", "dev", "/refs", "a.png")
    assert shown.show_sample_references and "the reference folder and the sample reference images" in shown.note


def test_check_reports_unmatched_pairs_and_refuses_them_for_a_flavour_without_references(studio, tmp_path):
    images_with_captions(tmp_path / "after", 3)
    (tmp_path / "before").mkdir()
    for name in ("img_00.png", "img_01.png", "extra.png"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "before" / name)
    result = checked(studio, tmp_path / "after", **{"dataset.conditioning": str(tmp_path / "before")})
    assert result.verdict == "warnings" and "2 usable, 1 skipped" in result.line
    assert "1 target without a reference image of the same name in before/: img\\_02.png" in result.details
    assert "1 reference with no target of the same name in after/: extra.png; ignored" in result.details
    assert "edit pairs, data.datasets[0]: 2 placements with a reference from before/ (strict" in result.buckets
    refused = checked(studio, tmp_path / "after", **{"dataset.conditioning": str(tmp_path / "before"),
                                                     "model.family": "flux1", "model.flavour": "dev"})
    assert refused.line.startswith("will not train — the form has problems")
    assert "data.datasets[0].conditioning: FLUX.1 [dev] (flux1 dev) takes no reference image" in refused.details


# ---------------------------------------------------------------------- captioning


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip(tmp_path_factory.mktemp("captioner") / "blip")


def wait_until_done(job: CaptionRunner, timeout: float = 60) -> None:
    assert job.join(timeout), "captioning did not finish"


def test_captioning_writes_sidecars_and_reports_progress(studio, blip_dir, tmp_path):
    images = make_images(tmp_path / "data", 3)
    lines = []

    def watched(*args, progress, **kwargs):
        def spy(done, total, name):
            progress(done, total, name)
            lines.append(studio.captioning.snapshot().line)

        return caption_dataset(*args, progress=spy, **kwargs)

    studio.captioning = CaptionRunner(watched)
    # A relative folder is taken from the workdir.
    outcome = studio.caption_start("data", "blip", str(blip_dir), trigger="ohwx", prefix="photo", max_length=16,
                                   batch_size=2, overwrite=False)
    assert outcome.ok, outcome.problems
    wait_until_done(studio.captioning)
    assert lines == ["captioning 1/3: image_0.png", "captioning 2/3: image_1.png", "captioning 3/3: image_2.png"]
    snapshot = studio.captioning.snapshot()
    assert snapshot.state == "finished" and not snapshot.running
    assert (snapshot.done, snapshot.total) == (3, 3)
    assert snapshot.line.startswith(f"finished: captioned 3 of 3 images in {(tmp_path / 'data').resolve()}")
    assert "loading the blip captioner" in snapshot.log and "captioning 3 images on cpu" in snapshot.log
    for image in images:
        assert sidecar(image).read_text(encoding="utf-8").startswith("photo, ohwx, ")


def test_stop_ends_captioning_before_the_next_batch(studio, blip_dir, tmp_path):
    images = make_images(tmp_path, 3)
    first_done = threading.Event()

    def stops_after_one(*args, progress, should_stop, **kwargs):
        def held(done, total, name):
            progress(done, total, name)
            first_done.set()
            deadline = time.monotonic() + 30
            while not should_stop() and time.monotonic() < deadline:  # hold until the test asks to stop
                time.sleep(0.01)

        return caption_dataset(*args, progress=held, should_stop=should_stop, **kwargs)

    studio.captioning = CaptionRunner(stops_after_one)
    assert studio.caption_stop() == "no captioning in progress"
    assert studio.caption_start(str(tmp_path), "blip", str(blip_dir), max_length=16, batch_size=1).ok
    assert first_done.wait(60)
    assert studio.caption_stop().startswith("stopping")
    assert studio.captioning.snapshot().line == "stopping after the current batch (1/3)"
    wait_until_done(studio.captioning)
    snapshot = studio.captioning.snapshot()
    assert snapshot.state == "stopped" and "captioned 1 of 3 images" in snapshot.line
    assert "stopped before the end" in snapshot.line
    assert sidecar(images[0]).is_file() and not sidecar(images[1]).exists() and not sidecar(images[2]).exists()


def test_captioning_is_refused_while_training_and_while_captioning(tmp_path):
    make_images(tmp_path, 2)
    runner = FakeRunner(running=True)
    studio = Studio(runner, tmp_path)
    outcome = studio.caption_start(str(tmp_path), "blip")
    assert not outcome.ok and "a training run is in progress" in outcome.message
    assert studio.captioning.snapshot().state == "idle"

    release = threading.Event()

    def waits(folder, *args, progress, **kwargs):
        release.wait(30)
        from trainer.data.captioners import CaptionSummary

        return CaptionSummary(folder)

    runner.running = False
    studio.captioning = CaptionRunner(waits)
    assert studio.caption_start(str(tmp_path), "blip").ok
    try:
        again = studio.caption_start(str(tmp_path), "blip")
        assert not again.ok and "captioning is already in progress" in again.message
        started = studio.start(studio.default_values())  # training waits for the captioner too
        assert not started.ok and started.message == CAPTIONING_IN_PROGRESS and runner.started == []
    finally:
        release.set()
        wait_until_done(studio.captioning)
    assert studio.captioning.snapshot().state == "finished"


def test_captioning_errors_are_shown_and_the_job_can_start_again(studio, blip_dir, tmp_path):
    make_images(tmp_path, 1)
    bad = studio.caption_start(str(tmp_path), "blip", max_length=8, batch_size=0)
    assert not bad.ok and bad.problems == [  # in the page's words: the control, what is wrong, how to fix it
        "Max length (tokens) (Automatic captions): must be a whole number from 16 to 512 (tokens per caption; 200 "
        "suits most captions) (caption_max_length = 8); Batch size (Automatic captions): must be a whole number of "
        "at least 1 (images per model call; lower it if memory runs out) (caption_batch_size = 0)"]
    assert not studio.caption_start(str(tmp_path / "none"), "blip").ok
    assert not studio.caption_start(str(tmp_path), "llava").ok

    assert studio.caption_start(str(tmp_path), "blip", str(tmp_path / "no-model")).ok  # fails in the thread
    wait_until_done(studio.captioning)
    snapshot = studio.captioning.snapshot()
    assert snapshot.state == "failed" and "cannot load the blip captioning model" in snapshot.line

    def crashes(*args, **kwargs):
        raise RuntimeError("out of cheese")

    studio.captioning._caption = crashes
    assert studio.caption_start(str(tmp_path), "blip").ok
    wait_until_done(studio.captioning)
    snapshot = studio.captioning.snapshot()
    assert snapshot.line == "failed: RuntimeError: out of cheese" and "Traceback" in snapshot.log

    studio.captioning._caption = None  # the real one (in a child process) again, with a model that loads
    assert studio.caption_start(str(tmp_path), "blip", str(blip_dir), max_length=16).ok
    wait_until_done(studio.captioning)
    assert studio.captioning.snapshot().state == "finished"


# ---------------------------------------------------------------------- the caption editor


def test_editor_loads_pages_and_saves_an_edited_caption(studio, tmp_path):
    images = images_with_captions(tmp_path / "data", 14)
    images[13].with_suffix(".txt").unlink()  # no caption yet
    state, outcome = studio.load_captions(str(tmp_path / "data"))
    assert outcome.ok and outcome.message == f"14 images in {(tmp_path / 'data').resolve()}"
    assert state["names"][:2] == ["img_00.png", "img_01.png"] and state["captions"][1] == "a picture number 1"
    assert caption_editor.page_count(state) == 2 and list(caption_editor.page_indices(state)) == list(range(12))
    assert caption_editor.thumbnail(state, 0).size == (64, 64)

    page = [state["captions"][i] for i in caption_editor.page_indices(state)]
    page[1] = "a  red square\non a table "
    state = caption_editor.keep_edits(state, page)
    state = caption_editor.go_to_page(state, 1)
    assert list(caption_editor.page_indices(state)) == [12, 13]
    state = caption_editor.keep_edits(state, ["a picture number 12", "the last one"])
    assert caption_editor.changed_count(state) == 2

    state, outcome = studio.save_captions(state)
    assert outcome.ok and outcome.message == "saved 2 changed captions"
    assert images[1].with_suffix(".txt").read_text(encoding="utf-8") == "a red square on a table\n"
    assert images[13].with_suffix(".txt").read_text(encoding="utf-8") == "the last one\n"
    assert images[0].with_suffix(".txt").read_text(encoding="utf-8") == "a picture number 0\n"  # untouched
    assert caption_editor.changed_count(state) == 0
    assert studio.save_captions(state)[1].message == "nothing changed: no caption written"
    assert not list((tmp_path / "data").glob(".*.tmp"))


def test_editor_never_writes_outside_the_folder(studio, tmp_path):
    folder = tmp_path / "data"
    images_with_captions(folder, 2)
    outside = tmp_path / "secret.txt"
    outside.write_text("keep me\n", encoding="utf-8")
    state, _ = studio.load_captions(str(folder))

    forged = dict(state, names=["../secret.png", *state["names"][1:]], captions=["overwritten", *state["captions"][1:]])
    forged, outcome = studio.save_captions(forged)
    assert not outcome.ok and "not a file name in the dataset folder; refused" in outcome.problems[0]
    assert outside.read_text(encoding="utf-8") == "keep me\n"
    with pytest.raises(Exception, match="refused"):
        caption_editor.sidecar_path(folder, "../secret.png")

    # A caption file that is a link to a file outside: refused, on load and on save.
    folder.joinpath("img_01.txt").unlink()
    folder.joinpath("img_01.txt").symlink_to(outside)
    state, outcome = studio.load_captions(str(folder))
    assert state["names"] == ["img_00.png"] and "1 images are left out" in outcome.notes[0]
    linked = dict(state, names=["img_01.png"], captions=["overwritten"], originals=["keep me"])
    _, outcome = studio.save_captions(linked)
    assert not outcome.ok and "resolves outside the dataset folder" in outcome.problems[0]
    assert outside.read_text(encoding="utf-8") == "keep me\n"

    # An image linked in from outside is not shown either.
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    folder.joinpath("linked.png").symlink_to(tmp_path / "elsewhere.png")
    state, _ = studio.load_captions(str(folder))
    assert "linked.png" not in state["names"]


def test_editor_keeps_a_caption_changed_on_disk_and_reports_missing_folders(studio, tmp_path):
    images = images_with_captions(tmp_path / "data", 1)
    state, _ = studio.load_captions(str(tmp_path / "data"))
    images[0].with_suffix(".txt").write_text("written by the captioner\n", encoding="utf-8")
    state = caption_editor.keep_edits(state, ["my edit"])
    _, outcome = studio.save_captions(state)
    assert not outcome.ok and "changed on disk since it was loaded" in outcome.problems[0]
    assert images[0].with_suffix(".txt").read_text(encoding="utf-8") == "written by the captioner\n"

    state, outcome = studio.load_captions(str(tmp_path / "none"))
    assert not outcome.ok and "does not exist" in outcome.message and state["names"] == []
    assert not studio.load_captions("")[1].ok
    assert "Load captions first" in studio.save_captions(caption_editor.empty_state())[1].problems[0]
