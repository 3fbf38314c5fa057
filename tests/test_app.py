"""The app: starts without torch, decides the login safely, trains the demo end to end through its API for two
browsers at once while the page keeps answering, and uses only the folders it was given."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import app

ROOT = Path(__file__).resolve().parents[1]


def test_ui_and_app_import_without_torch():
    code = ("import sys, ui, app; import ui.run_state, ui.form, ui.studio, ui.dataset_check, ui.captioning, "
            "ui.caption_editor, trainer.folders, ui.jobs, ui.presets, ui.uploads, ui.quickstart, ui.run_history; "
            "print('torch' in sys.modules)")
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
    assert args.workdir == ROOT and args.allow == [] and not args.no_browser


def test_upload_limits_are_flags_and_gradio_refuses_a_bigger_file(tmp_path):
    args = app.build_parser().parse_args(["--upload-max-mb", "300", "--upload-max-files", "50"])
    assert (args.upload_max_mb, args.upload_max_files) == (300, 50)
    assert app.launch_options(args, tmp_path, None, open_browser=False)["max_file_size"] == "300mb"


def test_listen_binds_every_interface_and_the_folders_follow_who_can_reach_the_app(tmp_path):
    parse = app.build_parser().parse_args
    local = parse(["--port", "7000", "--allow", str(tmp_path)])
    options = app.launch_options(local, tmp_path, None, open_browser=False)
    assert options["server_name"] == "127.0.0.1" and options["server_port"] == 7000
    assert app.allowed_folders(local) == [tmp_path.resolve(), Path.home().resolve()]  # private: home too
    listening = parse(["--listen", "--allow", str(tmp_path)])
    assert app.launch_options(listening, tmp_path, None, open_browser=False)["server_name"] == "0.0.0.0"
    assert app.allowed_folders(listening) == [tmp_path.resolve()]  # reachable by others: only what was listed
    assert app.allowed_folders(parse(["--share"])) == []
    # gradio serves by path only the outputs, the demo and saved jobs; never the remembered form or the app's venv
    assert options["allowed_paths"] == [str(tmp_path / "output"), str(tmp_path / ".studio" / "demo"),
                                        str(tmp_path / ".studio" / "jobs")]
    assert str(tmp_path / ".studio" / "last_form.toml") in options["blocked_paths"]
    assert str(tmp_path / ".studio" / "last_form.filled.json") in options["blocked_paths"]
    assert str(tmp_path / ".venv") in options["blocked_paths"]


def test_listen_names_the_addresses_a_browser_can_open_and_a_missing_share_link_says_so():
    lines = app.address_lines(app.ALL_INTERFACES, 7860, ["192.168.1.5", "10.0.0.2"])
    assert lines == ["Flux LoRA Studio: http://localhost:7860",
                     "On your network: http://192.168.1.5:7860  http://10.0.0.2:7860"]
    assert app.address_lines(app.LOCALHOST, 7860, ["192.168.1.5"]) == ["Flux LoRA Studio: http://localhost:7860"]
    assert all(not address.startswith("127.") for address in app.network_addresses())
    assert app.share_line(False, None, 7860) is None
    assert app.share_line(True, "https://x.gradio.live", 7860) == "Public link: https://x.gradio.live"
    assert "could not be made" in app.share_line(True, None, 7860)


def test_the_browser_opens_where_there_is_a_desktop():
    parse = app.build_parser().parse_args
    assert app.should_open_browser(parse([]), "win32", {})  # a double-clicked launch.bat
    assert app.should_open_browser(parse([]), "linux", {"DISPLAY": ":0"})
    assert app.should_open_browser(parse([]), "linux", {"WAYLAND_DISPLAY": "wayland-0"})
    assert not app.should_open_browser(parse([]), "linux", {})  # ssh: no text browser takes the terminal
    assert not app.should_open_browser(parse(["--no-browser"]), "darwin", {})


def test_exposure_is_warned_about():
    parse = app.build_parser().parse_args
    assert any("--listen without --auth" in w for w in app.exposure_warnings(parse(["--listen"])))
    assert app.exposure_warnings(parse(["--listen", "--auth", "me:pw"])) == []
    assert "no such folder" in app.exposure_warnings(parse(["--allow", "/no/such/folder"]))[0]


# ---------------------------------------------------------------------- the desktop entry

DESKTOP = ROOT / "flux-lora-studio.desktop"
GIO_LAUNCH = """import sys, gi
gi.require_version("Gio", "2.0")
from gi.repository import Gio
sys.exit(0 if Gio.DesktopAppInfo.new_from_filename(sys.argv[1]).launch([], None) else 1)
"""


def _desktop_entry() -> dict[str, str]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(DESKTOP, encoding="utf-8")
    return dict(parser["Desktop Entry"])


def test_the_desktop_entry_opens_launch_sh_in_a_terminal():
    entry = _desktop_entry()
    assert entry["Type"] == "Application" and entry["Name"] == "Flux LoRA Studio"
    assert entry["Terminal"] == "true" and "launch.sh" in entry["Exec"] and entry["Exec"].endswith(" %k")
    assert os.access(DESKTOP, os.X_OK) and os.access(ROOT / "launch.sh", os.X_OK)  # desktops launch these only


def _has_gio() -> bool:
    """The system python has GLib's bindings (Debian: python3-gi), to launch a desktop entry as desktops do."""
    system = Path("/usr/bin/python3")
    return system.exists() and subprocess.run([str(system), "-c", "import gi"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_gio(), reason="needs GLib's python bindings for /usr/bin/python3 (python3-gi)")
def test_the_desktop_entry_finds_launch_sh_beside_it_even_through_a_link(tmp_path):
    """Launched the way file managers and menus launch it (GLib's GDesktopAppInfo), with Terminal off and a stand-in
    launch.sh that says where it ran: once from the app's folder, once through a link in an applications folder."""
    app_dir, menu = tmp_path / "studio app", tmp_path / "applications"  # a space in the path, as users have
    app_dir.mkdir()
    menu.mkdir()
    text = DESKTOP.read_text(encoding="utf-8").replace("Terminal=true", "Terminal=false")
    (app_dir / DESKTOP.name).write_text(text, encoding="utf-8")
    marker = tmp_path / "ran.txt"
    stand_in = app_dir / "launch.sh"
    stand_in.write_text(f'#!/bin/sh\necho "$0 $FLUX_STUDIO_PAUSE" > "{marker}"\n', encoding="utf-8")
    stand_in.chmod(0o755)
    (menu / DESKTOP.name).symlink_to(app_dir / DESKTOP.name)
    for entry in (app_dir / DESKTOP.name, menu / DESKTOP.name):
        marker.unlink(missing_ok=True)
        subprocess.run(["/usr/bin/python3", "-c", GIO_LAUNCH, str(entry)], check=True, timeout=30)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.read_text(encoding="utf-8").strip() == f"{stand_in} 1", entry


# ---------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

@contextlib.contextmanager
def _in_process_app(workdir: Path) -> Iterator[object]:
    """A gradio_client Client of an app built and served in this process, closed afterwards."""
    from gradio_client import Client

    from trainer.runners.thread import TrainingRunner
    from ui.page import build_app
    from ui.served import allowed_paths

    blocks = build_app(TrainingRunner(), workdir)
    blocks.launch(prevent_thread_lock=True, server_port=_free_port(), allowed_paths=allowed_paths(workdir),
                  quiet=True)
    try:
        yield Client(blocks.local_url, verbose=False, download_files=False)
    finally:
        blocks.close()



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


def _launch(workdir: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, object]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = (workdir / "app.log").open("w")
    # Its own gradio cache beside the workdir. In the shared /tmp/gradio, apps of the same install name a cached file
    # by its content (one hash seed per install), gradio rewrites a cached image in place, and each app's cleanup
    # deletes the others' old files: a test's app served a file shorter than it had announced there once.
    cache = workdir.parent / f"{workdir.name}-gradio-cache"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(cache),
               **(env or {}))
    env.pop("OMP_NUM_THREADS", None)  # the app chooses its own (tests set 1 for themselves)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workdir", str(workdir), "--no-browser",
         *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, url, log


def _shut_down(process: subprocess.Popen, log) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _call(url: str, api_name: str, session: str, data: list | None = None) -> list:
    """One API call over plain HTTP (gradio's /call route), in the session of one browser tab."""
    body = json.dumps({"data": data if data is not None else [{}], "session_hash": session}).encode()
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        event = json.loads(answer.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event}", timeout=30) as answer:
        stream = answer.read().decode()
    return json.loads(stream.rsplit("data: ", 1)[1])


def _timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def _summary(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    return (f"{name}: {len(ordered)} requests, median {1000 * statistics.median(ordered):.0f} ms, "
            f"p90 {1000 * p90:.0f} ms, max {1000 * ordered[-1]:.0f} ms")


def _crowd_polls(url: str, clients: int, polls: int) -> tuple[list[float], list[float]]:
    """`clients` browser tabs polling the run at once, `polls` times each: the response times of their first polls
    (gradio sets a session up then) and of the later ones. Any error fails."""
    def client(number: int) -> list[float]:
        seconds = []
        for _ in range(polls):
            took, answer = _timed(lambda: _call(url, "poll", f"crowd-{number}"))
            assert answer[0].startswith(("running: step", "completed")), answer[0]
            seconds.append(took)
        return seconds

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(client, range(clients)))
    return [seconds[0] for seconds in answers], [took for seconds in answers for took in seconds[1:]]


@pytest.mark.slow
def test_two_browsers_share_one_run_and_the_page_answers_while_it_trains(tmp_path):
    """The first browser starts the demo; the second is refused a second Start and watches the first's run (and
    may stop it). All along the page and the poll answer within 200 ms: the demo builds and trains in a process of
    its own at a lower priority, and the page is built once per visitor. Twenty API clients polling at once
    during training all get answers."""
    from gradio_client import Client

    from ui.studio import ALREADY_RUNNING

    process, url, log = _launch(tmp_path)
    try:
        _wait_until_up(url, process, timeout=120)
        first = Client(url, verbose=False, download_files=False)
        second = Client(url, verbose=False, download_files=False)
        assert second.predict(api_name="/poll")[0] == "idle"
        started, problems = first.predict(train_max_steps=1000, sample_every_steps=100, api_name="/start")
        assert started.startswith("started: 1000 steps; building the demo"), (started, problems)
        refused, problems = second.predict(api_name="/start")
        assert refused == ALREADY_RUNNING and problems["value"] == ALREADY_RUNNING and problems["visible"]

        timings: dict[str, list[float]] = {"page while building": [], "poll while building": [],
                                           "page while training": [], "poll while training": []}
        steps: list[int] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(timings["poll while training"]) < 15:
            page_s, _ = _timed(lambda: urllib.request.urlopen(url, timeout=30).read())
            poll_s, answer = _timed(lambda: _call(url, "poll", "second-browser-tab"))
            status = answer[0]
            # step 0 is still loading and caching (seconds on a busy machine): training shows from the first step
            phase = "training" if re.match(r"running: step [1-9]", status) else "building"
            if status.startswith(("running", "starting")):
                timings[f"page while {phase}"].append(page_s)
                timings[f"poll while {phase}"].append(poll_s)
            if phase == "training":
                steps.append(int(re.match(r"running: step (\d+)/1000", status).group(1)))
            elif not status.startswith(("starting", "running")):
                break  # ended early (a fast machine): what was measured is reported
            time.sleep(0.25)
        report = "\n".join(_summary(name, seconds) for name, seconds in timings.items() if seconds)
        print(f"\nresponse times while the demo runs (steps {steps[:1]}..{steps[-1:]}):\n{report}")
        assert len(timings["poll while training"]) >= 8, report
        assert steps == sorted(steps) and steps[-1] > steps[0], steps  # the second browser sees it move
        for phase in ("building", "training"):
            for what in ("poll", "page"):
                seconds = sorted(timings[f"{what} while {phase}"])
                if seconds:
                    assert seconds[max(0, round(0.9 * len(seconds)) - 1)] < 0.2, report

        first_polls, later_polls = _crowd_polls(url, clients=20, polls=3)
        crowd = (_summary("20 clients polling at once, first polls", first_polls) + "\n"
                 + _summary("20 clients polling at once, later polls", later_polls))
        print(crowd)
        assert max(first_polls + later_polls) < 10, crowd

        watched = second.predict(api_name="/poll")
        assert watched[0].startswith(("running: step", "completed")), watched[0]
        assert "stopping" in second.predict(api_name="/stop") or watched[0].startswith("completed")
        status = ""
        while time.monotonic() < deadline:
            status = first.predict(api_name="/poll")[0]
            if status.startswith(("completed", "failed", "stopped")):
                break
            time.sleep(0.5)
        assert status.startswith(("stopped", "completed")), status + "\n" + (tmp_path / "app.log").read_text()[-3000:]
        output = tmp_path / "output" / "demo_lora"
        assert (output / "demo_lora.safetensors").is_file() and str(output) in status
        assert list((output / "samples").glob("*.png"))
    finally:
        _shut_down(process, log)


def _fake_frpc(hf_home: Path) -> None:
    """gradio's tunnel binary, replaced by one that fails at once: a test never opens a public link."""
    from gradio.tunneling import BINARY_FILENAME

    binary = hf_home / "gradio" / "frpc" / BINARY_FILENAME
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho 'login to server failed: tests open no share link'\n", encoding="utf-8")
    binary.chmod(0o755)


def _lan_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None when it has only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="the fake tunnel binary is a shell script")
def test_share_asks_for_the_printed_password_and_listen_serves_the_network(tmp_path):
    _fake_frpc(tmp_path / "hf")
    env = {"HF_HOME": str(tmp_path / "hf"), "GRADIO_SHARE_SERVER_ADDRESS": "127.0.0.1:9"}
    process, url, log = _launch(tmp_path, "--share", "--listen", env=env)
    try:
        _wait_until_up(url, process, timeout=120)
        printed = (tmp_path / "app.log").read_text()
        login = re.search(r"share link login -> user: (\S+)  password: (\S+)", printed)
        assert login and login.group(1) == "studio", printed
        assert "Folders the page may use: " + str(tmp_path.resolve()) + "\n" in printed  # no home folder
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}config", timeout=10)
        assert refused.value.code == 401
        wrong = urllib.parse.urlencode({"username": "studio", "password": "guess"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}login", data=wrong, timeout=10)
        right = urllib.parse.urlencode({"username": "studio", "password": login.group(2)}).encode()
        with urllib.request.urlopen(f"{url}login", data=right, timeout=10) as answer:
            assert answer.status == 200
            cookies = answer.headers.get_all("set-cookie")
        cookie = "; ".join(header.split(";", 1)[0] for header in cookies)
        with urllib.request.urlopen(urllib.request.Request(f"{url}config", headers={"Cookie": cookie}),
                                    timeout=10) as answer:
            assert answer.status == 200
        address = _lan_address()
        if address is not None:  # --listen: the app answers on the network address too
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url.replace("127.0.0.1", address) + "config", timeout=10)
            assert refused.value.code == 401
        deadline = time.monotonic() + 30
        while "Could not create share link" not in (tmp_path / "app.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "app.log").read_text()
            time.sleep(0.5)
        assert process.poll() is None  # no link (no network in tests): the app says so and keeps serving
        while "No public link" not in (printed := (tmp_path / "app.log").read_text()):
            assert time.monotonic() < deadline, printed
            time.sleep(0.5)
        assert "the app serves locally at http://localhost:" in printed
        assert "share=True" not in printed and "0.0.0.0" not in printed and "On your network: " in printed
    finally:
        _shut_down(process, log)


IMAGE_FOLDER = "Image folder (Dataset, data.datasets[0].path)"  # as the page's messages name it


@pytest.mark.slow
def test_dataset_tab_endpoints(tmp_path):
    """check_dataset, the captioning poll and the caption editor through the API of an app built in-process."""
    from trainer.demo import build_demo_dataset

    with _in_process_app(tmp_path) as client:
        assert client.predict(api_name="/check_dataset")[0].startswith("not built yet")
        dataset = build_demo_dataset(tmp_path / ".studio" / "demo")
        verdict, health, buckets = client.predict(api_name="/check_dataset")
        assert verdict.startswith("ok — 12 images") and "**Dataset health: ok**" in health
        assert "```text\nBuckets: 1 for 12 samples" in buckets
        # Its messages name the controls as the page shows them, and the key.
        verdict, health, _ = client.predict(data_resolution="64, big", api_name="/check_dataset")
        assert verdict.startswith("will not train") and "- Resolution (px) (Dataset): 'big' is not a whole number" \
            in health and "(data.resolution = '64, big')" in health
        health = client.predict(train_batch_size=16, api_name="/check_dataset")[1].replace("\\", "")
        assert "| error | Batch size (Training, train.batch_size) | 12 samples (images × repeats) cannot fill one " \
               "batch of 16; lower it or add images |" in health
        health = client.predict(dataset_path="nowhere", api_name="/check_dataset")[1].replace("\\", "")
        assert "| Image folder (Dataset, data.datasets[0].path): nowhere/ | dataset folder does not exist" in health
        _, problems = client.predict(caption_batch_size=0, api_name="/caption_start")
        assert problems["value"] == ("Batch size (Automatic captions): must be a whole number of at least 1 (images "
                                     "per model call; lower it if memory runs out) (caption_batch_size = 0)")

        assert client.predict(api_name="/caption_poll")[0] == "idle"
        started, _ = client.predict(caption_model="blip", caption_source=str(tmp_path / "no-model"),
                                    caption_overwrite=True, api_name="/caption_start")
        assert started.startswith("captioning ")
        deadline = time.monotonic() + 60
        while (line := client.predict(api_name="/caption_poll")[0]).startswith(("loading", "captioning")):
            assert time.monotonic() < deadline, line
            time.sleep(0.2)
        assert line.startswith("failed: cannot load the blip captioning model")  # the app goes on
        assert "or give as Model source (Automatic captions, caption_source) the path of a local folder" in line

        os.symlink("/etc", tmp_path / "link_out")
        for path in ("../..", "/etc", str(tmp_path / "link_out")):  # the last: a link leading out of the workdir
            verdict = client.predict(dataset_path=path, api_name="/check_dataset")[0]
            assert verdict == "will not train — a folder is outside the folders this app may use", path
            refused = client.predict(dataset_path=path, api_name="/captions_load")[0]
            assert refused.startswith(f"not loaded: refused: the {IMAGE_FOLDER} {path!r}"), refused
            assert client.predict(dataset_path=path, api_name="/caption_start")[0].startswith(
                f"not started: refused: the {IMAGE_FOLDER} {path!r}")
        status, problems = client.predict(dataset_path="/etc", api_name="/start")  # Start names the control too
        assert status == "not started: a path is outside the folders this app may use", status
        assert problems["value"].startswith(f"refused: the {IMAGE_FOLDER} '/etc' is outside"), problems
        verdict = client.predict(dataset_conditioning="/etc", api_name="/check_dataset")[0]  # edit pairs' references
        assert verdict == "will not train — a folder is outside the folders this app may use"
        assert "refused: the job file '/etc/passwd'" in client.predict(path="/etc/passwd", api_name="/load_job")[-1]
        notice, *_ = client.predict(job_path="../escape.toml", api_name="/save_job")
        assert "refused: the job file '../escape.toml'" in notice and not (tmp_path.parent / "escape.toml").exists()

        loaded = client.predict(api_name="/captions_load")
        assert loaded[0] == f"12 images in {dataset}" and loaded[1].startswith("page 1 of 1")
        boxes = {f"caption_{i + 1}": update["value"] for i, update in enumerate(loaded[14:26])}
        saved = client.predict(**dict(boxes, caption_2="a new caption"), api_name="/captions_save")
        assert saved[0] == "saved 1 changed caption"
        assert (dataset / "shape_01.txt").read_text(encoding="utf-8") == "a new caption\n"


@pytest.mark.slow
def test_memory_endpoints(tmp_path, monkeypatch):
    """The live low-VRAM verdict and the estimator tab through the API of an app built in-process."""
    from trainer.estimator.core import PHASES
    from trainer.memory import system_ram

    # one RAM figure for both endpoints: this machine's available RAM moves between two calls on a shared machine
    monkeypatch.setattr(system_ram, "available_ram_gib", lambda: 20.0)
    with _in_process_app(tmp_path) as client:
        job = {"model_flavour": "klein-base-9b", "model_source": "", "model_base_precision": "bf16",
               "model_text_encoder_precision": "bf16", "data_resolution": "512", "train_batch_size": 1,
               "train_mixed_precision": "bf16", "sample_prompts": "", "lowvram_vram_gib": "8",
               "lowvram_strategy": "conservative", "lowvram_override_blocks_to_swap": True}
        verdict, plan = client.predict(**job, lowvram_blocks_to_swap=0, api_name="/lowvram_check")
        assert verdict.startswith("will not fit — ") and plan.startswith("**Plan:** strategy conservative")
        swapped, plan = client.predict(**job, lowvram_blocks_to_swap=30, api_name="/lowvram_check")
        assert not swapped.startswith("will not fit") and "30 blocks swapped" in plan

        line, details, bars, strategies, breakdown = client.predict(**job, lowvram_blocks_to_swap=30,
                                                                    gpu_vram_gib=0, api_name="/estimate")
        assert line == swapped and "| training step |" in details
        assert list(dict.fromkeys(row[0] for row in bars["data"])) == list(PHASES)
        assert [row[0] for row in strategies["data"]] == ["this job: conservative + its own settings", "none",
                                                          "conservative", "aggressive", "extreme"]
        assert breakdown["data"][0][0].startswith("base weights")

        line, *_ = client.predict(**job, lowvram_swap_prefetch="many", api_name="/estimate")
        # one message naming the field as the page shows it (and its key); the app goes on
        assert line.startswith("problems — Prefetch (blocks) (Low VRAM): ") and "(lowvram.swap_prefetch" in line
        assert client.predict(**job, api_name="/lowvram_check")[0].startswith("will not fit")


# ---------------------------------------------------------------------- one session, step by step; resume


@pytest.fixture(scope="module")
def studio_app(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    """(client, workdir, form values that train the prebuilt demo) of one app shared by the tests below."""
    from gradio_client import Client

    workdir = tmp_path_factory.mktemp("studio")
    process, url, log = _launch(workdir, "--allow", str(demo_dir))  # the prebuilt demo lies outside the workdir
    try:
        _wait_until_up(url, process, timeout=120)
        form = {"model_source": str((demo_dir / "flux2").resolve()),
                "dataset_path": str((demo_dir / "dataset").resolve()),
                "sample_prompts": "", "sample_every_steps": 0, "sample_steps": "2"}
        yield Client(url, verbose=False, download_files=False), workdir, form
    finally:
        _shut_down(process, log)


def _wait_for(client, workdir: Path, *prefixes: str, timeout: float = 120) -> str:
    status = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(api_name="/poll")[0]
        if status.startswith(prefixes):
            return status
        if status.startswith("failed"):
            break
        time.sleep(0.3)
    raise AssertionError(f"waited for {prefixes}, status {status!r}\n" + (workdir / "app.log").read_text()[-3000:])


@pytest.mark.slow
def test_train_steps_validate_save_and_end_through_the_api(studio_app):
    client, workdir, form = studio_app
    out = workdir / "stepwise"
    job = dict(form, output_dir=str(out), train_max_steps=20, sample_prompts="shapez a red circle")
    assert client.predict(api_name="/validate_now")[0] == "nothing to sample: start or train first"
    started, problems = client.predict(steps=3, **job, api_name="/train_steps")
    assert started.startswith("started: training 3 steps"), (started, problems)
    assert _wait_for(client, workdir, "paused") == \
        "paused at step 3 — Train N steps to continue, End training to finish"
    assert client.predict(steps=2, **job, api_name="/train_steps")[0] == "training 2 more steps from step 3"
    assert _wait_for(client, workdir, "paused").startswith("paused at step 5 ")

    assert client.predict(api_name="/validate_now")[0] == "sampling at step 5"
    _wait_for(client, workdir, "paused")
    assert (out / "samples" / "step000005_0.png").is_file()
    assert client.predict(api_name="/save_now")[0] == "saving the LoRA at step 5"
    _wait_for(client, workdir, "paused")
    assert (out / "demo_lora-step000005.safetensors").is_file()

    assert client.predict(api_name="/end_training")[0].startswith("ending")
    status = _wait_for(client, workdir, "completed", "stopped", "ended")
    assert status == f"ended: LoRA saved to {out / 'demo_lora.safetensors'}"  # 5 of 20 steps, ended by the user
    assert (out / "demo_lora.safetensors").is_file()
    assert client.predict(api_name="/end_training")[0] == "no session to end: start or train first"


@pytest.mark.slow
def test_the_app_offers_to_resume_an_interrupted_run(studio_app, demo_dir: Path):
    from trainer.events import Progress
    from trainer.runners.base import Commands
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    client, workdir, form = studio_app
    out = workdir / "interrupted"
    spec = resolve_paths(load_spec(demo_dir / "job.toml", ["train.max_steps=6", "sample.prompts=[]",
                                                          f"output.dir='{out}'"]), demo_dir)
    commands = Commands()

    def stop_at_step_2(event) -> None:
        if isinstance(event, Progress) and event.step == 2:
            commands.request_stop()

    session = Session(spec, emit=stop_at_step_2, commands=commands)  # a headless run, stopped halfway
    try:
        session.run()
    finally:
        session.end()

    offer = client.predict(output_dir=str(out), train_max_steps=6, api_name="/resume_offer")
    assert offer.startswith(f"An interrupted run was found at step 2 in {out}"), offer
    assert client.predict(output_dir=str(workdir / "elsewhere"), train_max_steps=6, api_name="/resume_offer") == ""

    resumed, problems = client.predict(**form, output_dir=str(out), train_max_steps=6, api_name="/resume")
    assert resumed.startswith("resumed: 6 steps"), (resumed, problems)
    status = _wait_for(client, workdir, "completed", "stopped")
    assert status.startswith(f"completed: LoRA saved to {out / 'demo_lora.safetensors'}"), status
    assert client.predict(output_dir=str(out), train_max_steps=6, api_name="/resume_offer") == ""
