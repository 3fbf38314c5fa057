"""Jobs as files from the UI: save to a path and load back into the form; the form remembered across restarts
(written on Start and Save at once, on changes after a quiet second; a broken file is set aside with a notice)."""

from __future__ import annotations

import time
from pathlib import Path

from test_ui_state import FakeRunner

from trainer.spec import parse_spec
from ui import form
from ui.jobs import BROKEN_SUFFIX, LAST_FORM, LastForm
from ui.studio import Studio


def test_save_to_a_typed_path_and_load_it_back(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    values = dict(studio.default_values(), **{"lora.rank": 12, "train.max_steps": 33})
    path, outcome = studio.save_job(values, path="jobs/mine.toml")  # relative: from the workdir
    assert path == (tmp_path / "jobs" / "mine.toml").resolve() and outcome.message == f"saved {path}"
    loaded, hidden, outcome = studio.load_job("jobs/mine.toml")
    assert outcome.ok and outcome.message == "loaded mine.toml" and loaded == values
    default, _ = studio.save_job(values)
    assert default == studio.jobs_dir / "demo_lora.toml"


def test_an_uploaded_job_fills_the_form_and_problems_are_named(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    upload = tmp_path / "upload" / "theirs.toml"  # gradio's upload folder lies outside the allowed ones
    upload.parent.mkdir()
    job = form.default_job(tmp_path)
    job["lora"]["rank"] = 24
    from trainer.spec import spec_to_toml

    upload.write_text(spec_to_toml(parse_spec(job)), encoding="utf-8")
    values, _, outcome = studio.load_upload(upload)
    assert outcome.ok and values["lora.rank"] == 24
    upload.write_text("[lora]\nrank = 0\n", encoding="utf-8")
    values, _, outcome = studio.load_upload(upload)
    assert values is None and outcome.message == "not loaded: theirs.toml"
    assert any(problem.startswith("theirs.toml: lora.rank") for problem in outcome.problems)
    values, _, outcome = studio.load_job("missing.toml")
    assert values is None and outcome.problems[0].startswith("missing.toml: file not found")


def test_the_last_form_waits_for_quiet_then_writes_once(tmp_path):
    spec = parse_spec(form.default_job(tmp_path))
    last = LastForm(tmp_path / LAST_FORM, delay=0.3)
    for rank in (4, 8, 16):  # a burst of changes
        last.remember(spec.model_copy(update={"lora": spec.lora.model_copy(update={"rank": rank})}))
        time.sleep(0.05)
    assert not last.path.exists()  # still within the quiet time
    deadline = time.monotonic() + 5
    while not last.path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "rank = 16" in last.path.read_text(encoding="utf-8")
    restored = last.restore(tmp_path)
    assert restored.spec is not None and restored.spec.lora.rank == 16 and restored.notice == ""


def test_start_and_save_remember_the_form_at_once_and_a_restart_restores_it(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    values = dict(studio.default_values(), **{"lora.rank": 7})
    assert studio.start(values).ok
    restarted = Studio(FakeRunner(), tmp_path)  # the app started again on the same workdir
    restored, hidden, notice, filled = restarted.restore()
    assert restored == values and notice == "" and hidden["lora"]["rank"] == 7 and filled is None

    studio.save_job(dict(values, **{"lora.rank": 9}))
    assert Studio(FakeRunner(), tmp_path).restore()[0]["lora.rank"] == 9


def test_a_form_with_problems_keeps_the_last_good_one(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    studio.last_form.delay = 0.0
    good = dict(studio.default_values(), **{"lora.rank": 5})
    studio.remember(good)
    studio.last_form.flush()
    studio.remember(dict(good, **{"lora.rank": -1}))  # mid-edit: not a job
    studio.last_form.flush()
    assert Studio(FakeRunner(), tmp_path).restore()[0] == good


def test_a_broken_saved_form_is_set_aside_with_a_notice(tmp_path):
    path = tmp_path / ".studio" / LAST_FORM
    path.parent.mkdir(parents=True)
    for broken, why in [("[lora\nrank = ", "not valid TOML"), ("[lora]\nrank = 0\n", "lora.rank"),
                        ("spec_version = 99\n", "spec_version")]:
        path.write_text(broken, encoding="utf-8")
        values, hidden, notice, _ = Studio(FakeRunner(), tmp_path).restore()
        assert values is None and hidden is None
        assert notice.startswith("The form saved when the app last ran could not be restored (last_form.toml: ")
        assert why in notice and f"it was moved to {path}{BROKEN_SUFFIX}" in notice
        assert "The demo job is shown instead." in notice
        assert not path.exists() and Path(f"{path}{BROKEN_SUFFIX}").read_text(encoding="utf-8") == broken
        assert Studio(FakeRunner(), tmp_path).restore() == (None, None, "", None)  # the next load starts clean


def test_the_last_fill_is_kept_so_presets_still_tell_edits_after_a_restart(tmp_path):
    studio = Studio(FakeRunner(), tmp_path)
    studio.last_form.delay = 0.0
    values = studio.default_values()
    filled = dict(values, **{"train.learning_rate": 1e-4})  # what a preset filled in
    studio.remember(dict(filled, **{"lora.rank": 64}), filled=filled)  # then the user typed a rank
    studio.last_form.flush()
    restored, _, _, kept = Studio(FakeRunner(), tmp_path).restore()
    assert restored["lora.rank"] == 64 and kept == filled
    studio.last_form.filled_path.write_text("[not json", encoding="utf-8")
    assert Studio(FakeRunner(), tmp_path).restore()[3] is None  # the defaults stand in
