"""Jobs and the form, through the Studio object and the form's helpers (pure python, no browser): a loaded job's
relative paths are taken as the CLI takes them; leaving the demo replaces its demo-only values; messages name
what the page shows."""

from __future__ import annotations

from pathlib import Path

from test_ui_state import FakeRunner

from trainer.__main__ import _load_job as cli_load_job
from ui.studio import Studio


def test_load_job_takes_relative_paths_from_the_job_files_folder_as_the_cli_does(tmp_path: Path, demo_dir: Path):
    studio = Studio(FakeRunner(), tmp_path, allowed=[demo_dir])
    values, _, outcome = studio.load_job(str(demo_dir / "job.toml"))
    assert outcome.ok, outcome.problems
    cli = cli_load_job(str(demo_dir / "job.toml"), [])
    assert values["model.source"] == cli.model.source == str((demo_dir / "flux2").resolve())
    assert values["dataset.path"] == cli.data.datasets[0].path == str((demo_dir / "dataset").resolve())
    assert values["output.dir"] == cli.output.dir == str((demo_dir / "output").resolve())

    # An upload has no folder the browser tells: the workdir stands in, and the notice says which paths.
    values, _, outcome = studio.load_upload(demo_dir / "job.toml", "job.toml")
    assert values["model.source"] == str(tmp_path.resolve() / "flux2")
    assert any("model.source" in note and "data.datasets[0].path" in note and "workdir" in note
               for note in outcome.notes), outcome.notes


def test_leaving_the_demo_replaces_its_own_values_and_says_which(tmp_path: Path):
    from test_ui_presets import demo_values

    from trainer.profiles import list_presets
    from ui import presets
    from ui.form import demo_dir

    demo = demo_dir(tmp_path)
    values = demo_values(tmp_path)
    changes, notice = presets.leave_demo(values, "flux2", "klein-base-9b", demo)
    assert set(changes) == set(presets.DEMO_ONLY)
    assert changes["model.base_precision"] == "bf16" and changes["data.resolution"] != "64"
    assert changes["dataset.path"] == changes["dataset.trigger"] == changes["sample.prompts"] == ""
    assert notice.startswith("left the demo") and "model.base_precision 'fp32' → 'bf16'" in notice
    assert presets.leave_demo(values, "flux2", "demo", demo) == ({}, "")  # still the demo
    edited = dict(values, **{"data.resolution": "768", "dataset.path": str(tmp_path / "mine")})
    assert "data.resolution" not in presets.leave_demo(edited, "flux2", "klein-base-9b", demo)[0]
    assert "dataset.path" not in presets.leave_demo(edited, "flux2", "klein-base-9b", demo)[0]

    # A real preset applied over the demo's leftovers (flavour switched by hand): none of them survive.
    preset = next(p.name for p in list_presets("flux2", "klein-base-9b"))
    switched = dict(values, **{"model.flavour": "klein-base-9b", "model.source": ""})
    filled = presets.fill(switched, None, values, None, preset, demo)
    assert filled.ok, filled.problems
    assert "left the demo" in filled.message
    shown = filled.values
    assert shown["dataset.path"] == "" and shown["dataset.trigger"] == "" and shown["sample.prompts"] == ""
    assert shown["model.base_precision"] != "fp32" and shown["data.resolution"] != "64"
    assert shown["train.learning_rate"] != 0.005


def test_messages_name_the_field_as_the_page_shows_it(tmp_path: Path):
    from ui import words

    labels = {"lora.rank": "Rank", "dataset.path": "Image folder"}
    assert words.in_page_words("lora.rank: Input should be greater than or equal to 1 (got 0)", labels) == \
        "Rank (LoRA): must be at least 1 (lora.rank = 0)"
    assert words.in_page_words("data.datasets[0].path: required but missing", labels) == \
        "Image folder (Dataset): required but missing (data.datasets[0].path)"
    assert words.in_page_words("lora.alpha: whatever", labels) == "lora.alpha: whatever"  # no control: as it is
    studio = Studio(FakeRunner(), tmp_path)
    studio.labels.update(labels)
    outcome = studio.start(dict(studio.default_values(), **{"lora.rank": 0}))
    assert "Rank (LoRA): must be at least 1 (lora.rank = 0)" in outcome.problems
    # As typed: one field's value on its own.
    assert words.problems_for("lora.rank", 0, studio.default_values(), labels) == [
        "Rank (LoRA): must be at least 1 (lora.rank = 0)"]
    assert words.problems_for("lora.rank", 8, studio.default_values(), labels) == []


# What the flavour and TREAD switch the walk below sets, so that every limit counts (guidance on a flavour with a
# guidance embedding, TREAD's blocks while it is on); the values typed, at least one of them outside every limit.
CONTEXT = {"Family": "flux1", "Flavour": "dev", "TREAD token routing": True}
TYPED = (-1, 0, 10**6)
NO_LIMITS = {"Logit mean", "Mode scale"}  # any number is a mean; a scale of any sign


def test_every_number_field_checks_its_limits_as_typed_naming_itself(tmp_path: Path):
    """Every number component of the page, typed outside its limits: a warning that names its label (gradio's
    own minimum/maximum would refuse it with "Value 0 is less than minimum value 1." and no name); every slider
    clamps what is typed into its box."""
    import warnings

    import gradio as gr

    from trainer.runners.thread import TrainingRunner
    from ui.page import build_app

    blocks = build_app(TrainingRunner(), tmp_path)
    checks = {target: fn for fn in blocks.fns.values() for target, event in fn.targets if event == "input"}
    numbers = [block for block in blocks.blocks.values() if isinstance(block, gr.Number)]
    assert len(numbers) > 30
    walked = set()
    for number in numbers:
        assert number.minimum is None and number.maximum is None, number.label
        if number.elem_id == "multi-gpu-processes":
            continue  # the section's plan line says what is wrong with it as it changes
        check = checks[number._id]
        context = [CONTEXT[block.label] for block in check.inputs[1:]]
        said = []
        for value in TYPED:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check.fn(number.preprocess(value), *context)
            said += [str(warning.message) for warning in caught]
        if number.label in NO_LIMITS:
            assert said == [], said
            continue
        assert said and all(line.startswith(f"{number.label}") for line in said), (number.label, said)
        walked.add(number.label)
    assert {"Guidance min", "Start block", "Bucket step", "Steps to train now", "GPU memory (GiB)"} <= walked
    # A slider's number box takes any typed number (it then shows the bound): the value sent is clamped, never an
    # error naming no field.
    sliders = [block for block in blocks.blocks.values() if isinstance(block, gr.Slider)]
    assert len(sliders) >= 5
    for slider in sliders:
        assert slider.preprocess(slider.maximum + 1) == slider.maximum, slider.label
        assert slider.preprocess(slider.minimum - 1) == slider.minimum, slider.label


def test_the_swap_slider_clamps_a_stale_value_instead_of_raising():
    # Loading a demo job over a klein-9B one: other controls' change events still sent 25 against a bound of 2,
    # and gradio's Slider raised "Value 25 is greater than maximum value 2." for each.
    import ui
    from ui.sliders import BoundSlider

    slider = BoundSlider(minimum=0, maximum=2, step=1)
    assert slider.preprocess(25) == 2 and slider.preprocess(-1) == 0 and slider.preprocess(1) == 1
    assert slider.get_block_name() == "slider"  # the browser draws it as gradio's own slider
    assert not list(Path(ui.__file__).parent.glob("*.pyi"))  # gradio writes no stub into the project
