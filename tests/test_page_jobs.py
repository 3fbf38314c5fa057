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
