"""The Run view from synthetic events, and the form ↔ spec mapping (pure python: no gradio; torch only in the
target-count test, which builds a transformer on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from trainer.events import (
    DownloadProgress,
    EvalLoss,
    LogMessage,
    LoraSaved,
    PhaseChanged,
    Progress,
    RunFinished,
    RunStarted,
    SampleSaved,
)
from trainer.spec import SpecError, deep_merge, parse_spec, resolve_paths
from ui import form
from ui.resume import find_interrupted_run, latest_state_step
from ui.run_state import LOG_LINES, LOSS_SMOOTHING, RunView, format_duration
from ui.studio import ALREADY_RUNNING, Studio, target_counts


def progress(step: int, loss: float, max_steps: int = 10) -> Progress:
    return Progress(step=step, max_steps=max_steps, loss=loss, learning_rate=1e-3, steps_per_second=2.0,
                    eta_seconds=(max_steps - step) / 2.0)


# ---------------------------------------------------------------------- RunView


def test_idle_view():
    view = RunView()
    assert view.status_text() == "idle"
    assert view.losses == [] and view.gallery() == [] and view.log_text() == ""
    assert view.progress_fraction() == 0.0


def test_running_status_and_progress():
    view = RunView()
    view.begin(10, "starting demo")
    assert view.status_text() == "starting"
    view.apply([PhaseChanged(phase="building demo", detail="/tmp/demo")])
    assert view.status_text() == "starting: building demo"
    view.apply([RunStarted(max_steps=10, output_dir="/out", family="flux2", flavour="demo"),
                PhaseChanged(phase="training"), progress(3, 0.5)])
    assert view.status_text() == "running: step 3/10"
    assert view.progress_fraction() == pytest.approx(0.3)
    line = view.progress_line()
    assert "step 3/10" in line and "2.00 it/s" in line and "ETA 0:00:04" in line and "loss 0.5000" in line
    view.apply([PhaseChanged(phase="sampling")])
    assert view.status_text() == "running: step 3/10 (sampling)"


def test_sampling_and_saving_leave_the_status_line_when_training_goes_on():
    view = RunView()
    view.begin(10)
    view.apply([PhaseChanged(phase="training"), progress(3, 0.5), PhaseChanged(phase="sampling"),
                SampleSaved(step=3, path="/s.png", prompt="p")])
    assert view.status_text() == "running: step 3/10 (sampling)"
    view.apply([progress(4, 0.5)])  # the session says nothing when it trains again: the next step does
    assert view.status_text() == "running: step 4/10"
    view.apply([PhaseChanged(phase="saving"), LoraSaved(step=4, path="/l.safetensors"), progress(5, 0.4)])
    assert view.status_text() == "running: step 5/10"


def test_loss_smoothing_is_an_exponential_moving_average():
    view = RunView()
    view.begin(10)
    view.apply([progress(1, 1.0), progress(2, 0.0), progress(3, 0.0)])
    smoothed = [point.smoothed for point in view.losses]
    beta = LOSS_SMOOTHING
    assert smoothed == pytest.approx([1.0, beta, beta * beta])
    rows = view.loss_rows()
    assert [(r["step"], r["series"]) for r in rows[:2]] == [(1, "loss"), (1, "smoothed")]
    assert {r["series"] for r in rows} == {"loss", "smoothed"} and len(rows) == 6


def test_a_long_run_plots_a_thinned_loss_with_the_newest_step():
    view = RunView()
    view.begin(5000)
    view.apply(progress(step, 1.0 / step, 5000) for step in range(1, 5001))
    steps = [row["step"] for row in view.loss_rows(max_points=1000) if row["series"] == "loss"]
    assert len(steps) <= 1001 and steps[0] == 1 and steps[-1] == 5000
    assert len(view.loss_rows(max_points=10_000)) == 2 * 5000


def test_evaluation_losses_are_a_plot_series_and_in_the_progress_line():
    view = RunView()
    view.begin(10)
    view.apply([progress(1, 0.5), progress(2, 0.4)])
    assert "eval" not in view.progress_line()
    view.apply([EvalLoss(step=2, loss=0.3125), progress(3, 0.2), EvalLoss(step=3, loss=0.25)])
    evals = [(r["step"], r["loss"]) for r in view.loss_rows() if r["series"] == "eval"]
    assert evals == [(2, 0.3125), (3, 0.25)]
    assert len(view.loss_rows()) == 3 * 2 + 2
    assert "eval loss 0.2500 (step 3)" in view.progress_line()
    assert "evaluation loss at step 2: 0.3125" in view.log_text()
    view.begin(10)
    assert view.eval_losses == [] and "eval" not in view.progress_line()


def test_progress_line_shows_memory_and_step_time():
    view = RunView()
    view.begin(10)
    view.apply([progress(1, 0.5)])  # a Progress without measurements (an old events.jsonl) shows none
    assert "GiB" not in view.progress_line() and "s/step" not in view.progress_line()
    view.apply([Progress(step=2, max_steps=10, loss=0.4, learning_rate=1e-3, steps_per_second=16.0,
                         eta_seconds=0.5, step_seconds=0.0625, ram_gib=1.23, vram_gib=0.0)])
    assert view.progress_line().endswith("trainer RAM 1.2 GiB · 0.06 s/step")  # the machine's is the gauges'


def test_samples_keep_their_order_and_the_gallery_shows_newest_first():
    view = RunView()
    view.begin(10)
    view.apply([SampleSaved(step=5, path="/o/a.png", prompt="a cat"),
                SampleSaved(step=5, path="/o/b.png", prompt="a dog"),
                SampleSaved(step=10, path="/o/c.png", prompt="a cat")])
    assert [s.path for s in view.samples] == ["/o/a.png", "/o/b.png", "/o/c.png"]
    assert view.gallery() == [("/o/c.png", "step 10: a cat"), ("/o/b.png", "step 5: a dog"),
                              ("/o/a.png", "step 5: a cat")]


def test_log_tail_is_capped():
    view = RunView()
    view.begin(10)
    view.apply([LogMessage(level="info", message=f"line {i}") for i in range(LOG_LINES + 50)])
    lines = view.log_text().splitlines()
    assert len(lines) == LOG_LINES
    assert lines[-1].endswith(f"line {LOG_LINES + 49}")
    view.apply([LogMessage(level="error", message="Traceback\n  boom")])
    assert view.log_text().splitlines()[-2:][0].endswith("error: Traceback")


@pytest.mark.parametrize(("status", "expected"), [
    ("completed", "completed: LoRA saved to /out/demo.safetensors"),
    ("stopped", "stopped: LoRA saved to /out/demo.safetensors"),
])
def test_finished_status(status, expected):
    view = RunView()
    view.begin(10)
    view.apply([progress(4, 0.2), LoraSaved(step=4, path="/out/demo.safetensors"),
                RunFinished(status=status, step=4, lora_path="/out/demo.safetensors")])
    assert view.status_text() == expected
    assert not view.active


def test_finished_message_is_not_repeated():
    view = RunView()
    view.begin(10)
    view.apply([RunFinished(status="completed", step=10, lora_path="/l.safetensors",
                            message="LoRA saved to /l.safetensors")])
    assert view.status_text() == "completed: LoRA saved to /l.safetensors"
    view.begin(10)
    view.apply([RunFinished(status="stopped", step=3, lora_path="/l.safetensors", message="stopped by the user")])
    assert view.status_text() == "stopped: LoRA saved to /l.safetensors (stopped by the user)"


def test_failed_status_carries_the_message():
    view = RunView()
    view.begin(10)
    view.apply([RunFinished(status="failed", step=0, message="model.source: folder missing")])
    assert view.status_text() == "failed: model.source: folder missing"
    assert "failed" in view.log_text()


def test_a_thread_that_dies_silently_fails_the_run():
    view = RunView()
    view.begin(10)
    view.thread_ended()
    assert view.status_text().startswith("failed: the training thread ended")
    view.thread_ended()  # a finished run stays as it is
    assert view.log_text().count("training thread ended") == 1


def test_begin_forgets_the_previous_run():
    view = RunView()
    view.begin(10)
    view.apply([progress(1, 1.0), SampleSaved(step=1, path="/x.png", prompt="p"),
                RunFinished(status="completed", step=1, lora_path="/l")])
    first = view.run_id
    view.begin(20)
    assert view.run_id == first + 1
    assert view.losses == [] and view.samples == [] and view.step == 0 and view.status_text() == "starting"


def test_stop_request_shows_until_the_run_ends():
    view = RunView()
    assert view.request_stop() is False
    view.begin(10)
    view.apply([progress(2, 0.3)])
    assert view.request_stop() is True
    assert view.status_text() == "stopping: step 2/10"
    view.apply([RunFinished(status="stopped", step=3, lora_path="/l.safetensors")])
    assert view.status_text() == "stopped: LoRA saved to /l.safetensors"


def test_paused_session_shows_how_to_go_on():
    view = RunView()
    view.begin(10)
    view.apply([RunStarted(max_steps=10, output_dir="/out", family="flux2", flavour="demo"), progress(3, 0.5),
                PhaseChanged(phase="paused", detail="step 3")])
    assert view.status_text() == "paused at step 3 — Train N steps to continue, End training to finish"
    assert view.paused and not view.active
    view.thread_ended()  # the runner is idle while paused: that is no failure
    assert view.paused
    view.resume_action("training 7 more steps from step 3")
    assert view.status_text() == "running: step 3/10" and view.active
    view.apply([PhaseChanged(phase="training"), progress(10, 0.4), PhaseChanged(phase="paused", detail="step 10")])
    assert view.status_text() == "paused at step 10 — max_steps reached, End training to finish"
    assert [p.step for p in view.losses] == [3, 10]  # a paused session keeps its history
    view.resume_action()
    view.apply([RunFinished(status="completed", step=10, lora_path="/l.safetensors")])
    assert view.status_text() == "completed: LoRA saved to /l.safetensors"


def test_a_download_shows_in_the_progress_line_until_loading_goes_on():
    view = RunView()
    view.begin(10)
    view.apply([PhaseChanged(phase="downloading", detail="org/model (*.safetensors)"),
                DownloadProgress(repo_id="org/model", downloaded_bytes=1_200_000_000, total_bytes=16_000_000_000,
                                 files_done=3, files_total=12)])
    assert view.status_text() == "starting: downloading"
    assert "downloading org/model: 1.2/16.0 GB (8 %), 3/12 files" in view.progress_line()
    view.apply([DownloadProgress(repo_id="org/model", downloaded_bytes=500_000_000, total_bytes=0)])
    assert "downloading org/model: 0.5 GB" in view.progress_line()
    view.apply([PhaseChanged(phase="loading")])
    assert "downloading" not in view.progress_line()


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(float("nan")) == "?"


# ---------------------------------------------------------------------- form ↔ spec


@pytest.fixture
def defaults(tmp_path):
    return form.spec_to_values(parse_spec(form.default_job(tmp_path)))


def test_every_form_key_names_a_spec_field():
    spec_dict = parse_spec(form.default_job("/w")).model_dump()
    for key in form.FORM_KEYS:
        if key in form.SWITCHES:  # a slider's "override" checkbox: it names the key it switches
            key = form.SWITCHES[key]
        section, name = key.split(".", 1)
        holder = spec_dict["data"]["datasets"][0] if section == "dataset" else spec_dict[section]
        assert name in holder, key
    assert len(set(form.FORM_KEYS)) == len(form.FORM_KEYS)


def test_defaults_give_the_demo_job_with_absolute_paths(tmp_path, defaults):
    spec = form.form_to_spec(defaults)
    expected = parse_spec(form.default_job(tmp_path))
    assert spec == expected
    demo = (tmp_path / ".studio" / "demo").resolve()
    assert spec.model.family == "flux2" and spec.model.flavour == "demo"
    assert spec.model.source == str(demo / "flux2")
    assert spec.data.datasets[0].path == str(demo / "dataset")
    assert spec.output.dir == str((tmp_path / "output" / "demo_lora").resolve())
    assert spec.sample.steps is None and spec.sample.guidance is None  # flavour defaults


def test_prompts_split_on_the_separator(defaults):
    values = dict(defaults, **{"sample.prompts": " a red circle |a blue square|| shapez  "})
    assert form.form_to_spec(values).sample.prompts == ["a red circle", "a blue square", "shapez"]
    assert form.spec_to_values(form.form_to_spec(values))["sample.prompts"] == \
        "a red circle | a blue square | shapez"


def test_dataset_fields_map_to_the_first_dataset(defaults):
    values = dict(defaults, **{"dataset.trigger": "ohwx", "dataset.repeats": 3})
    entry = form.form_to_spec(values).data.datasets[0]
    assert entry.trigger == "ohwx" and entry.repeats == 3


def test_bad_values_raise_spec_error_naming_the_field(defaults):
    values = dict(defaults, **{"lora.rank": 0, "train.scheduler": "fancy"})
    with pytest.raises(SpecError) as caught:
        form.form_to_spec(values)
    text = "\n".join(caught.value.problems)
    assert "lora.rank" in text and "train.scheduler" in text
    with pytest.raises(SpecError) as caught:
        form.form_to_spec(dict(defaults, **{"dataset.repeats": 0}))
    assert any(p.startswith("data.datasets[0].repeats") for p in caught.value.problems)


def test_empty_optional_numbers_mean_the_flavour_default(defaults):
    assert (defaults["sample.steps"], defaults["sample.guidance"]) == ("", "")
    spec = form.form_to_spec(dict(defaults, **{"sample.steps": " 8 ", "sample.guidance": "2.5"}))
    assert (spec.sample.steps, spec.sample.guidance) == (8, 2.5)
    assert form.spec_to_values(spec)["sample.steps"] == "8"
    spec = form.form_to_spec(dict(defaults, **{"sample.steps": "", "sample.guidance": None}))
    assert (spec.sample.steps, spec.sample.guidance) == (None, None)
    with pytest.raises(SpecError) as caught:
        form.form_to_spec(dict(defaults, **{"sample.steps": "many"}))
    assert caught.value.problems[0].startswith("sample.steps")


def test_hidden_fields_of_a_loaded_job_survive_the_form(defaults):
    job = deep_merge(form.default_job("/w"), {"train": {"distributed": "ddp"}})  # set by the Run tab's GPUs
    job["data"]["datasets"][0]["resolution"] = 128  # a dataset's own resolution
    loaded = parse_spec(job)
    spec = form.form_to_spec(defaults, form.hidden_fields(loaded))
    assert spec.train.distributed == "ddp" and spec.data.datasets[0].resolution == 128
    assert spec.model.source == defaults["model.source"]  # the form wins over the loaded job


# Every key the form gained for the extended spec, with a value that differs from the demo job's.
NEW_KEYS = {
    "dataset.masks": "/data/masks", "data.prior_loss_weight": 0.5, "data.eval_holdout": 2,
    "train.optimizer": "prodigy", "train.weight_decay": 0.1, "sample.prompt_library": "/data/prompts.toml",
    "output.keep_last": 5, "output.save_state": False, "output.log_with": ["tensorboard"],
    "output.formats": ["diffusers", "comfyui"], "output.comfy_lora_dir": "/comfy/models/loras",
    "advanced.min_timestep": 100, "advanced.max_timestep": 900, "advanced.guidance_mode": "random",
    "advanced.guidance_min": 2.0, "advanced.guidance_max": 5.0, "advanced.tread": True,
    "advanced.tread_selection_ratio": 0.25, "advanced.tread_start_block": 1, "advanced.tread_end_block": -1,
    "lora.type": "lora", "lora.init": "gaussian", "lora.init_from": "", "lora.targets": "attention",
    "train.eval_every_steps": 10,
}


def test_new_spec_settings_have_controls_and_keep_the_demo_defaults(tmp_path, defaults):
    assert set(NEW_KEYS) <= set(form.FORM_KEYS)
    assert defaults["train.optimizer"] == "adamw" and defaults["output.save_state"] is True
    assert defaults["output.log_with"] == [] and defaults["lora.targets"] == "all"
    assert defaults["output.formats"] == ["diffusers"] and defaults["output.comfy_lora_dir"] == ""
    assert defaults["advanced.tread"] is False and defaults["train.eval_every_steps"] == 0
    assert defaults["dataset.masks"] == "" and defaults["sample.prompt_library"] == ""
    assert form.form_to_spec(defaults) == parse_spec(form.default_job(tmp_path))  # Start unchanged trains the demo


def test_new_keys_map_to_the_spec_and_back(defaults):
    values = dict(defaults, **NEW_KEYS, **{"model.flavour": "dev"})  # FLUX.2 dev reads the training guidance
    spec = form.form_to_spec(values)
    assert spec.data.datasets[0].masks == "/data/masks" and spec.data.eval_holdout == 2
    assert spec.data.prior_loss_weight == 0.5
    assert (spec.train.optimizer, spec.train.weight_decay, spec.train.eval_every_steps) == ("prodigy", 0.1, 10)
    assert spec.sample.prompt_library == "/data/prompts.toml"
    assert (spec.output.keep_last, spec.output.save_state, spec.output.log_with) == (5, False, ["tensorboard"])
    assert (spec.output.formats, spec.output.comfy_lora_dir) == (["diffusers", "comfyui"], "/comfy/models/loras")
    a = spec.advanced
    assert (a.min_timestep, a.max_timestep, a.guidance_mode, a.guidance_min, a.guidance_max) == \
        (100, 900, "random", 2.0, 5.0)
    assert (a.tread, a.tread_selection_ratio, a.tread_start_block, a.tread_end_block) == (True, 0.25, 1, -1)
    assert (spec.lora.type, spec.lora.init, spec.lora.targets) == ("lora", "gaussian", "attention")
    assert form.spec_to_values(spec) == values
    spec = form.form_to_spec(dict(defaults, **{"lora.init_from": " /loras/old.safetensors "}))
    assert spec.lora.init_from == "/loras/old.safetensors"


def test_a_loaded_job_with_the_new_keys_round_trips(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    job = deep_merge(form.default_job(tmp_path), {
        "model": {"flavour": "dev"},  # a flavour with a guidance embedding: the demo's would refuse guidance
        # a LoRA (LoKr is diffusers-only: the spec refuses a ComfyUI folder for it)
        "lora": {"type": "lora", "rank": 8, "targets": r"transformer_blocks\.\d+\.attn\.to_(q|v)"},
        "data": {"eval_holdout": 1, "prior_loss_weight": 0.75},
        "train": {"optimizer": "lion8bit", "weight_decay": 0.0, "eval_every_steps": 5},
        "sample": {"prompt_library": "prompts.toml", "prompts": ["@portrait", "<token> on a beach"]},
        "output": {"keep_last": 1, "save_state": False, "log_with": ["tensorboard", "wandb"],
                   "formats": ["diffusers"], "comfy_lora_dir": "loras"},
        "advanced": {"min_timestep": 50, "max_timestep": 950, "guidance_mode": "random", "guidance_max": 6.0,
                     "tread": True, "tread_start_block": 0, "tread_end_block": -2, "mode_scale": 1.1},
    })
    job["data"]["datasets"][0]["masks"] = "masks"
    job["data"]["datasets"].append({"path": "reg", "is_regularisation": True})
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(job), encoding="utf-8")
    values, hidden, outcome = studio.load_job(path)
    assert outcome.ok, outcome.problems
    assert values["lora.rank"] == 8 and values["output.log_with"] == ["tensorboard", "wandb"]
    assert values["output.formats"] == ["diffusers"]
    assert values["output.comfy_lora_dir"] == str((tmp_path / "loras").resolve())
    assert values["dataset.masks"] == str((tmp_path / "masks").resolve())
    assert values["sample.prompt_library"] == str((tmp_path / "prompts.toml").resolve())
    assert values["sample.prompts"] == "@portrait | <token> on a beach"
    assert "the others are kept as loaded" in outcome.notes[0]
    spec = form.form_to_spec(values, hidden)
    assert spec == resolve_paths(parse_spec(job), tmp_path)  # nothing lost: the regularisation set included
    assert spec.data.datasets[1].is_regularisation and spec.advanced.mode_scale == 1.1


@pytest.mark.parametrize(("changes", "problem"), [
    ({"advanced.min_timestep": 600, "advanced.max_timestep": 400}, "advanced.min_timestep: 600 must be below"),
    ({"model.flavour": "dev", "advanced.guidance_mode": "random", "advanced.guidance_min": 5.0,
      "advanced.guidance_max": 2.0}, "advanced.guidance_min: 5.0 is above guidance_max"),
    ({"train.eval_every_steps": 5}, "train.eval_every_steps: the evaluation loss needs held-out images"),
    ({"lora.targets": "mmdit"}, "lora.targets: 'mmdit' is not a flux2 preset"),
    ({"lora.targets": "blocks.(("}, "lora.targets: 'blocks.((' is neither a preset nor a valid regex"),
    ({"lora.type": "lokr", "lora.init": "pissa"}, "lora.init: 'pissa' applies to LoRA only"),
    ({"advanced.tread": True, "advanced.tread_end_block": 9}, "advanced.tread_end_block: 9 is outside"),
    ({"train.weight_decay": 2.0, "output.keep_last": 0}, "train.weight_decay"),
    ({"data.eval_holdout": -1}, "data.eval_holdout"),
    ({"output.log_with": ["mlflow"]}, "output.log_with[0]"),
])
def test_bad_new_values_reach_the_problems_box(tmp_path, changes, problem):
    runner = FakeRunner()
    studio = Studio(runner, tmp_path)
    outcome = studio.start(dict(studio.default_values(), **changes))
    assert not outcome.ok and runner.started == []
    assert any(p.startswith(problem) for p in outcome.problems), outcome.problems


def test_a_hold_out_from_the_demo_is_checked_once_the_demo_is_built(tmp_path):
    runner = FakeRunner()
    studio = Studio(runner, tmp_path)
    outcome = studio.start(dict(studio.default_values(), **{"data.eval_holdout": 2, "train.eval_every_steps": 5}))
    assert outcome.ok, outcome.problems
    spec, demo_dir = runner.started[0]
    assert demo_dir is not None and spec.data.eval_holdout == 2 and spec.train.eval_every_steps == 5


def test_target_choices_follow_the_family():
    assert form.target_choices("flux2") == ["all", "attention", "mlp", "tiny"]
    assert form.target_choices("flux1")[:4] == ["all", "attention", "mlp", "tiny"]
    assert {"mmdit", "context", "all+ffs", "context+ffs"} <= set(form.target_choices("flux1"))
    assert form.targets_for_family("flux2", "mmdit") == "all"  # a FLUX.1-only preset falls back
    assert form.targets_for_family("flux1", "mmdit") == "mmdit"
    assert form.targets_for_family("flux2", "attention") == "attention"
    assert form.targets_for_family("flux2", r"transformer_blocks\.0\..+") == r"transformer_blocks\.0\..+"
    assert form.targets_for_family("flux1", "") == "all"


def test_count_targets_shows_each_preset_on_the_demo():
    text = target_counts("flux2", "demo", "attention")
    rows = dict(line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")
                and "---" not in line and "preset" not in line)
    assert rows == {"all": "28", "**attention** (selected)": "20", "mlp": "8", "tiny": "6"}
    assert "2 double + 2 single blocks" in text
    assert "Cannot count" in target_counts("flux2", "nope")


def test_field_choices_come_from_the_spec():
    assert form.field_choices("train.scheduler")[0] == "constant"
    assert "logit_normal" in form.field_choices("advanced.timestep_sampling")
    assert form.field_choices("dataset.caption_strategy") == ["textfile", "filename", "instance_prompt"]
    assert form.field_choices("train.optimizer") == ["adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy"]
    assert form.field_choices("lora.init") == ["default", "gaussian", "pissa", "olora"]
    assert form.field_choices("lora.type") == ["lora", "lokr"]
    assert form.field_choices("advanced.guidance_mode") == ["constant", "random"]
    assert form.field_choices("output.log_with") == ["tensorboard", "wandb"]


def test_keyword_handler_maps_api_names_to_keys():
    seen = {}
    handler = form.keyword_handler(lambda values: seen.update(values), extra=("base",))
    handler(train_max_steps=6, sample_every_steps=3, base={"x": 1})
    assert seen == {"train.max_steps": 6, "sample.every_steps": 3, "base": {"x": 1}}


# ---------------------------------------------------------------------- the controller, without training


class FakeRunner:
    def __init__(self, running: bool = False) -> None:
        self.running = running
        self.live = False
        self.step = None
        self.action = "start" if running else None
        self.spec = None
        self.started = []

    def start(self, request):
        self.started.append((request.spec, request.demo_dir))
        self.running = True
        self.spec = request.spec

    @property
    def state(self):
        from trainer.runners.base import RunnerState

        return RunnerState((self.action or "start") if self.running else None, self.live, self.step)

    def stop(self):
        return self.running

    def join(self, timeout=None):
        return True

    def output_dir(self):
        return Path(self.spec.output.dir) if self.spec else None

    def drain(self):
        return []


def test_start_with_defaults_asks_the_runner_to_build_the_demo(tmp_path):
    runner = FakeRunner()
    studio = Studio(runner, tmp_path)
    outcome = studio.start(studio.default_values())
    assert outcome.ok, outcome.problems
    spec, demo_dir = runner.started[0]
    assert demo_dir == (tmp_path / ".studio" / "demo").resolve()
    assert spec == parse_spec(form.default_job(tmp_path))
    assert studio.view.status_text() == "starting"


def test_start_refuses_a_second_run(tmp_path):
    runner = FakeRunner(running=True)
    studio = Studio(runner, tmp_path)
    outcome = studio.start(studio.default_values())
    assert not outcome.ok and outcome.message == ALREADY_RUNNING
    assert "already in progress" in outcome.message
    assert runner.started == []


def test_start_reports_spec_and_file_problems_and_starts_nothing(tmp_path):
    runner = FakeRunner()
    studio = Studio(runner, tmp_path)
    bad = dict(studio.default_values(), **{"lora.rank": -1})
    outcome = studio.start(bad)
    assert not outcome.ok and any("lora.rank" in p for p in outcome.problems)
    missing = dict(studio.default_values(), **{"dataset.path": str(tmp_path / "nowhere")})
    outcome = studio.start(missing)
    assert any(p.startswith("data.datasets[0].path") for p in outcome.problems)
    assert runner.started == []


def test_save_and_load_a_job_round_trips(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    values = dict(studio.default_values(), **{"lora.rank": 8, "sample.prompts": "one | two"})
    path, outcome = studio.save_job(values)
    assert outcome.ok and path is not None and path.is_file()
    loaded, hidden, outcome = studio.load_job(path)
    assert outcome.ok
    assert loaded == values
    assert form.form_to_spec(loaded, hidden) == form.form_to_spec(values)


def test_load_edits_the_first_dataset_and_keeps_the_others(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    job = form.default_job(tmp_path)
    job["data"]["datasets"].append({"path": "elsewhere", "trigger": "other"})
    job["sample"]["resolution"] = 128
    path = tmp_path / "two.toml"
    path.write_text(tomli_w.dumps(job), encoding="utf-8")
    values, hidden, outcome = studio.load_job(path)
    assert outcome.ok and "the first of 2 datasets" in outcome.notes[0]
    spec = form.form_to_spec(dict(values, **{"dataset.trigger": "ohwx"}), hidden)
    assert [entry.trigger for entry in spec.data.datasets] == ["ohwx", "other"]
    assert spec.data.datasets[1].path == str((tmp_path / "elsewhere").resolve())
    assert spec.sample.resolution == 128


def test_load_reports_a_bad_file(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nrank = 0\n", encoding="utf-8")
    values, hidden, outcome = studio.load_job(bad)
    assert values is None and any("lora.rank" in p for p in outcome.problems)
    bad.write_text("not = [toml", encoding="utf-8")
    assert "not valid TOML" in studio.load_job(bad)[2].problems[0]


def test_check_dataset_lists_images_and_captions(tmp_path):
    from trainer.demo import build_demo_dataset

    studio = Studio(FakeRunner(), tmp_path)
    values = studio.default_values()
    assert "built on the first Start" in studio.check_dataset(values).details
    build_demo_dataset(studio.demo_dir)
    result = studio.check_dataset(values)
    assert result.line.startswith("ok — 12 images") and "shapez a" in result.details
    assert "resolution 64: 12 images" in result.buckets
    result = studio.check_dataset(dict(values, **{"dataset.path": str(tmp_path / "none")}))
    assert result.verdict == "will not train" and "does not exist" in result.details


def test_studio_answers_clearly_without_a_session(tmp_path):
    from trainer.runners.thread import TrainingRunner

    studio = Studio(TrainingRunner(), tmp_path)
    outcome = studio.validate_now()
    assert outcome.message == "nothing to sample: start or train first" and not outcome.ok
    assert "nothing to save" in studio.save_now().message
    assert "no session to end" in studio.end_training().message
    assert studio.stop() == "no run in progress"
    refused = studio.train_steps(studio.default_values(), 0).message
    assert "at least 1" in refused
    assert studio.view.status_text() == refused  # the refusal is what the status line shows


# ---------------------------------------------------------------------- the resume offer (files only)


def _interrupted(out: Path, steps: list[int], events: list[dict]) -> None:
    import json

    (out / "state").mkdir(parents=True)
    for step in steps:
        (out / "state" / f"step{step:06d}.safetensors").write_bytes(b"")
    (out / "state" / ".step000099.safetensors.x1y2.tmp").write_bytes(b"")  # a torn write is no state
    lines = [json.dumps(event) for event in events]
    (out / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


STARTED = {"event": "run_started", "max_steps": 10, "output_dir": "/o", "family": "flux2", "flavour": "demo"}


@pytest.mark.parametrize(("events", "offered"), [
    ([STARTED], True),  # crashed: no run_finished at all
    ([STARTED, {"event": "run_finished", "status": "stopped", "step": 4}], True),
    ([STARTED, {"event": "run_finished", "status": "failed", "step": 4}], True),
    ([STARTED, {"event": "run_finished", "status": "completed", "step": 10}, STARTED], True),  # a later run died
    ([STARTED, {"event": "run_finished", "status": "completed", "step": 4}], True),  # state short of max_steps
    ([{**STARTED, "max_steps": 4}, {"event": "run_finished", "status": "completed", "step": 4}], False),
])
def test_resume_offer_reads_state_names_and_the_last_run_finished(tmp_path, events, offered):
    out = tmp_path / "out"
    _interrupted(out, [2, 4], events)
    assert latest_state_step(out) == 4
    found = find_interrupted_run(out, max_steps=10)
    assert (found is not None) == offered
    if found:
        assert found.step == 4
        assert found.text().startswith(f"An interrupted run was found at step 4 in {out}")


def test_no_offer_without_a_state_and_the_studio_resolves_the_form_dir(tmp_path):
    assert find_interrupted_run(tmp_path / "none") is None and latest_state_step(tmp_path) is None
    studio = Studio(FakeRunner(), tmp_path)
    _interrupted(tmp_path / "output" / "x", [3], [STARTED])
    assert studio.resume_offer("output/x", 10).startswith("An interrupted run was found at step 3 in "
                                                         f"{(tmp_path / 'output' / 'x').resolve()}")
    assert studio.resume_offer("", 10) == ""
    outcome = studio.start(studio.default_values(), resume=True)
    assert outcome.message.startswith("not resumed: no saved training state")
