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


# ---------------------------------------------------------------------- what training would trip on (point 6)


def _one_error(capsys: pytest.CaptureFixture[str], job: Path, *argv: str) -> str:
    code, lines = _validate(capsys, str(job), *argv)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize(("key", "value"), [("lora.alpha", "inf"), ("advanced.logit_mean", "nan"),
                                            ("train.learning_rate", "-inf"), ("advanced.shift", "+inf")])
def test_non_finite_numbers_are_refused_by_validate(key: str, value: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error(capsys, _job(tmp_path), "--set", f"{key}={value}")
    assert f"{key}: " in line and "finite number" in line, line


def test_a_name_of_megabytes_and_brackets_5000_deep_give_one_message(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error(capsys, _job(tmp_path, name="n" * 1_000_000))
    assert "output.name: " in line and "is 1000000 bytes long" in line and len(line) < 400
    deep = tmp_path / "deep.toml"
    deep.write_text(_job(tmp_path).read_text(encoding="utf-8") + "\n[extra]\nx = " + "[" * 5000 + "]" * 5000 + "\n",
                    encoding="utf-8")
    line = _one_error(capsys, deep)
    assert "nest deeper than" in line and "RecursionError" not in line
    line = _one_error(capsys, _job(tmp_path), "--set", "lora.rank=" + "[" * 5000 + "]" * 5000)
    assert "lora.rank: its value nests deeper" in line


def test_a_job_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import threading

    fifo = tmp_path / "job.toml"
    os.mkfifo(fifo)
    answer: list[str] = []
    worker = threading.Thread(target=lambda: answer.append(_one_error(capsys, fifo)), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # it hangs on the read: give it a writer so the test process can end, then fail
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "w") as writer:
            writer.write("x = 1\n")
        pytest.fail("validate waited on a FIFO given as the job file")
    assert "is not a regular file" in answer[0], answer


@pytest.mark.parametrize(("key", "name"), [("sample.prompt_library", "prompts.toml"),
                                           ("lora.init_from", "start.safetensors")])
def test_a_fifo_the_job_names_is_refused_at_once(key: str, name: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A file the job names for its text or header (the prompt library, a LoRA to start from, the model's single
    files share the reader) that is a FIFO: validate refuses it by its key instead of waiting for a writer."""
    import os
    import threading

    fifo = tmp_path / name
    os.mkfifo(fifo)
    answer: list[tuple[int, list[str]]] = []
    setting = f"{key}={tomli_w.dumps({'v': str(fifo)})[4:]}"
    worker = threading.Thread(target=lambda: answer.append(_validate(capsys, str(_job(tmp_path)), "--set", setting)),
                              daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # it hangs on the open: give it a writer so the test process can end, then fail
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "w") as writer:
            writer.write("x = 1\n")
        worker.join(20)
        pytest.fail(f"validate waited on a FIFO given as {key}")
    code, lines = answer[0]
    about = [line for line in lines if f"{key}: " in line]  # the others: the demo model is not built here
    assert code == 2 and len(about) == 1 and "is not a regular file" in about[0], lines
