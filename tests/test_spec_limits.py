"""What a job may hold (issue 22): output.name is a name, never a path, and fits the file system; the CLI refuses
such a job with one message and exit 2, before anything is read or written."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from trainer.__main__ import main
from trainer.demo import demo_job_toml
from trainer.spec import MAX_NAME_BYTES, SpecError, parse_spec


def _job(tmp_path: Path, **output: object) -> Path:
    data = tomllib.loads(demo_job_toml("flux2"))
    data["output"].update(output)
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _validate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["validate", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err.strip().splitlines()


@pytest.mark.parametrize(("name", "words"), [
    ("/tmp/victim/x", "path separator"), ("../../../../../../tmp/victim/lora", "path separator"),
    ("..\\..\\victim", "path separator"), ("..", "'..'"), ("v1..2", "'..'"), ("C:lora", "drive letter"),
    ("x\ny", "control character"), ("nul\x00byte", "control character"), ("é" * 101, f"to {MAX_NAME_BYTES} bytes"),
])
def test_output_name_must_be_a_plain_name_that_fits(name: str, words: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tomllib.loads(demo_job_toml("flux2"))
    with pytest.raises(SpecError) as refused:
        parse_spec({**data, "output": {**data["output"], "name": name}})
    assert len(refused.value.problems) == 1 and refused.value.problems[0].startswith("output.name: ")
    assert words in refused.value.problems[0]
    code, lines = _validate(capsys, str(_job(tmp_path)), "--set", f"output.name={tomli_w.dumps({'v': name})[4:]}")
    assert code == 2 and len(lines) == 1 and "output.name: " in lines[0] and words in lines[0], lines
    assert not Path("/tmp/victim").exists()


def test_ordinary_names_still_pass() -> None:
    data = tomllib.loads(demo_job_toml("flux2"))
    for name in ("lora", "my lora v2", "portrait_style-01", "été", "x" * MAX_NAME_BYTES, "v1.2"):
        assert parse_spec({**data, "output": {**data["output"], "name": name}}).output.name == name
