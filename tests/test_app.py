"""The app: starts without torch, decides the login safely, and trains the demo end to end through its API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import app

ROOT = Path(__file__).resolve().parents[1]


def test_ui_and_app_import_without_torch():
    code = "import sys, ui, app; import ui.run_state, ui.form, ui.studio; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_help_answers_without_gradio_or_torch():
    code = ("import sys, runpy; sys.argv = ['app.py', '--help']\n"
            "try:\n    runpy.run_path('app.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'gradio' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_share_without_auth_makes_up_a_password():
    auth, message = app.decide_auth(share=True, auth=None)
    assert auth is not None and auth[0] == "studio" and len(auth[1]) >= 12
    assert message is not None and f"user: studio  password: {auth[1]}" in message
    assert app.decide_auth(share=True, auth=None)[0] != auth  # a fresh one each time


def test_given_auth_is_kept_and_local_runs_need_none():
    assert app.decide_auth(share=True, auth=("me", "pw")) == (("me", "pw"), None)
    assert app.decide_auth(share=False, auth=None) == (None, None)
    assert app.decide_auth(share=False, auth=("me", "pw")) == (("me", "pw"), None)


def test_malformed_auth_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["--auth", "nopassword"])
    assert "--auth" in capsys.readouterr().err
    assert app.build_parser().parse_args(["--auth", "me:p:w"]).auth == ("me", "p:w")


def test_defaults():
    args = app.build_parser().parse_args([])
    assert args.port == 7860 and not args.listen and not args.share and args.auth is None
    assert args.workdir == ROOT


# ---------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"app did not answer at {url} within {timeout} s")


@pytest.mark.slow
def test_app_trains_the_demo_through_its_api(tmp_path):
    from gradio_client import Client

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = (tmp_path / "app.log").open("w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workdir", str(tmp_path)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_up(url, process, timeout=120)
        client = Client(url, verbose=False, download_files=False)
        assert client.predict(api_name="/poll")[0] == "idle"
        started, problems = client.predict(train_max_steps=6, sample_every_steps=3, api_name="/start")
        assert started.startswith("started"), (started, problems)

        again, problems = client.predict(api_name="/start")
        assert "already in progress" in again

        status = ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = client.predict(api_name="/poll")[0]
            if status.startswith(("completed", "failed", "stopped")):
                break
            time.sleep(1)
        assert status.startswith("completed"), status + "\n" + (tmp_path / "app.log").read_text()[-3000:]

        output = tmp_path / "output" / "demo_lora"
        assert list(output.rglob("*.safetensors")), list(output.rglob("*"))
        assert list((output / "samples").glob("*.png"))
        assert str(output) in status
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
