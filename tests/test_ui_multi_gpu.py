"""The Run tab's "Several GPUs" section and the run it starts in other processes.

- The section lists the GPUs a (fake) NVML reports, plans the run on the ticked ones (the mode from choose_mode
  with the smallest ticked GPU, CUDA_VISIBLE_DEVICES in bus order) and says when there is no GPU.
- LaunchRunner on its own, with small scripts standing in for the trainer: events read as they are appended
  (never an older run's, never half a line), a Stop pressed before the session started still reaches it, and
  processes that die without a RunFinished end as failed with the tail of their output.
- Through the app's API (an app built in this process, FLUX_STUDIO_CPU_PROCESSES=1): the demo trained by two gloo
  processes through `accelerate launch` shows progress, loss and a sample in the Run view; Stop stops both ranks,
  the run ends "stopped" with its LoRA and state saved; one training at a time; and a crashed launch (a stand-in
  command) shows as failed with its stderr tail. The real launch costs about 30 s on two idle cores.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, python_env

from trainer.checkpoint import saved_states
from trainer.distributed import stop_file
from trainer.estimator.auto import choose_mode
from trainer.events import JsonlWriter, Progress, RunFinished, RunStarted
from trainer.runners.app import AppRunner
from trainer.runners.launch import EventsFollower, LaunchRequest, LaunchRunner, failure_cause
from trainer.runners.thread import TrainingRunner
from trainer.spec import load_spec, parse_spec
from ui import gpus, multi_gpu
from ui.multi_gpu import CPU, CPU_PROCESSES_ENV, Choice
from ui.studio import ALREADY_RUNNING


class FakeNvml:
    """pynvml's calls the section uses, for the GPUs given as (name, total GiB, used GiB); None: no driver."""

    def __init__(self, gpus: list[tuple[str, float, float]] | None) -> None:
        self.gpus = gpus

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.gpus is None:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        return self.gpus[handle][0].encode()  # older pynvml answers bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        _, total, used = self.gpus[handle]
        return SimpleNamespace(total=int(total * 2**30), used=int(used * 2**30))

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return (9, 0)


GPUS = [("NVIDIA H100 80GB HBM3", 80.0, 3.5), ("NVIDIA H100 80GB HBM3", 80.0, 0.0), ("NVIDIA RTX A6000", 48.0, 0.0)]


def _job() -> object:
    return parse_spec({"model": {"family": "flux2", "flavour": "klein-base-9b"}, "data": {
        "datasets": [{"path": "x"}], "resolution": 1024}})


def _clear_gpu_caches() -> None:
    from ui.memory import detected_vram_gib
    from ui.presets import detected_profile

    detected_vram_gib.cache_clear()
    detected_profile.cache_clear()


def _component(blocks: object, elem_id: str) -> object:
    return next(block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_the_section_lists_the_gpus_nvml_reports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ui.page import build_app

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(GPUS))
    monkeypatch.delenv(CPU_PROCESSES_ENV, raising=False)
    _clear_gpu_caches()
    try:
        blocks = build_app(TrainingRunner(), tmp_path)
    finally:
        _clear_gpu_caches()  # the app's first-GPU detection is asked once per process: forget the fake
    devices = _component(blocks, "multi-gpu-devices")
    assert devices.choices == [("GPU 0: NVIDIA H100 80GB HBM3, 80 GiB (3.5 GiB in use)", "0"),
                               ("GPU 1: NVIDIA H100 80GB HBM3, 80 GiB (0.0 GiB in use)", "1"),
                               ("GPU 2: NVIDIA RTX A6000, 48 GiB (0.0 GiB in use)", "2")]
    assert devices.value == ["0", "1", "2"] and _component(blocks, "multi-gpu-processes").value == 3
    assert _component(blocks, "multi-gpu-hardware").value.startswith("3 NVIDIA GPUs on this machine:")
    assert _component(blocks, "multi-gpu-start").visible

    found_gpus = gpus.list_gpus()
    spec = _job()
    found = multi_gpu.plan(spec, Choice(("1", "2"), 2), found_gpus, cpu_allowed=False)
    assert (found.mode, found.reason) == choose_mode(spec, 2, 48.0)  # the smallest ticked GPU decides
    assert not found.problems and found.describe().startswith(
        "2 processes on GPU 1, 2 (NVIDIA H100 80GB HBM3, NVIDIA RTX A6000) — ")
    env = multi_gpu.launch_env(found, {"ACCELERATE_USE_CPU": "true", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "ACCELERATE_USE_CPU" not in env and env["PATH"] == "/bin" and env["PYTHONPATH"] == str(ROOT)
    forced = multi_gpu.plan(multi_gpu.with_distributed(spec, "fsdp"), Choice(("0", "1"), 2), found_gpus, False)
    assert (forced.mode, forced.reason) == ("fsdp", "chosen in the job")

    def problems(*devices: str, processes: int = 2) -> tuple[str, ...]:
        return multi_gpu.plan(spec, Choice(devices, processes), found_gpus, cpu_allowed=False).problems

    assert problems("0", processes=1) == ("tick two or more GPUs (one GPU trains in this app: use Start above)",)
    assert problems("0", "7") == ("no GPU 7 on this machine (it has 0, 1, 2)",)
    assert problems("0", "1", "2") == ("one process per GPU: 3 GPUs ticked for 2 processes",)
    assert problems(CPU) == ("CPU processes (testing) are for tests: start the app with FLUX_STUDIO_CPU_PROCESSES=1 "
                             "to use them",)
    assert problems() == ("no device ticked: tick two or more GPUs",)


def test_without_a_gpu_the_section_says_so_and_offers_cpu_processes_only_for_tests() -> None:
    assert gpus.list_gpus(FakeNvml(None)) == [] and gpus.list_gpus(FakeNvml([])) == []
    assert multi_gpu.hardware_text([], cpu_allowed=False).startswith("No NVIDIA GPU found on this machine")
    assert multi_gpu.device_choices([], cpu_allowed=False) == []
    assert multi_gpu.device_choices([], cpu_allowed=True) == [("CPU processes (testing)", "cpu")]
    assert multi_gpu.default_devices([], cpu_allowed=True) == ["cpu"]
    assert multi_gpu.cpu_processes_allowed({CPU_PROCESSES_ENV: "1"})
    assert not multi_gpu.cpu_processes_allowed({}) and not multi_gpu.cpu_processes_allowed({CPU_PROCESSES_ENV: "0"})
    found = multi_gpu.plan(_job(), Choice((CPU,), 2), [], cpu_allowed=True)
    assert found.describe() == "2 CPU processes (testing) — ddp (auto: no GPU memory size to judge against)"
    env = multi_gpu.launch_env(found, {})
    assert env["ACCELERATE_USE_CPU"] == "true" and env["CUDA_VISIBLE_DEVICES"] == ""


# ---------------------------------------------------------------------- LaunchRunner with stand-in scripts

# Behaves as the session does towards the app: clears a stale stop file, reports RunStarted, then a step every
# 20 ms until output.dir/STOP appears (or 200 steps), then RunFinished.
STAND_IN = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    from trainer.events import JsonlWriter, Progress, RunFinished, RunStarted
    out = Path(sys.argv[1])
    (out / "STOP").unlink(missing_ok=True)
    time.sleep(0.3)  # the app polls meanwhile
    emit = JsonlWriter(out / "events.jsonl")
    emit(RunStarted(max_steps=200, output_dir=str(out), family="flux2", flavour="demo"))
    step = 0
    while step < 200 and not (out / "STOP").exists():
        step += 1
        emit(Progress(step=step, max_steps=200, loss=0.5, learning_rate=1e-3, steps_per_second=50, eta_seconds=1))
        time.sleep(0.02)
    emit(RunFinished(status="stopped" if step < 200 else "completed", step=step))
""")
# Reports two steps, then dies as a rank does when CUDA runs out of memory: a traceback on stderr, exit code 1.
CRASH = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from trainer.events import JsonlWriter, Progress, RunStarted
    out = Path(sys.argv[1])
    emit = JsonlWriter(out / "events.jsonl")
    emit(RunStarted(max_steps=9, output_dir=str(out), family="flux2", flavour="demo"))
    for step in (1, 2):
        emit(Progress(step=step, max_steps=9, loss=0.5, learning_rate=1e-3, steps_per_second=5, eta_seconds=1))
    print("[rank1]: Traceback (most recent call last):", file=sys.stderr)
    print('[rank1]:   File "trainer/session.py", line 531, in _train_until', file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
    sys.exit(1)
""")


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _follow(run: LaunchRunner, timeout: float = 30) -> list:
    """Drain `run` as the app's poll does until it has ended and said how."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = run.running
        events += run.drain()
        if not running and any(isinstance(event, RunFinished) for event in events):
            return events
        time.sleep(0.05)
    raise AssertionError(f"the run did not end: {events}")


def test_the_follower_reads_whole_new_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    JsonlWriter(path)(RunFinished(status="completed", step=5))  # an earlier run's
    follower = EventsFollower.from_end(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"event": "run_started", "max_steps": 3, "output_dir": "o", "family": "flux2", "flav')
    assert follower.read() == []
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('our": "demo", "time": 1.0}\nnot json\n{"event": "progress", "step": 1')
    assert follower.read() == [RunStarted(max_steps=3, output_dir="o", family="flux2", flavour="demo", time=1.0)]
    assert follower.read() == []


def test_a_stop_pressed_while_the_processes_start_still_reaches_them(tmp_path: Path) -> None:
    run = LaunchRunner()
    run.start(LaunchRequest([sys.executable, str(_script(tmp_path, "stand_in.py", STAND_IN)), str(tmp_path)],
                            tmp_path, env=python_env(), cwd=ROOT))
    while run.pid is None:
        time.sleep(0.01)
    assert run.running and run.stop() and stop_file(tmp_path).exists()  # the stand-in deletes it as it starts
    events = _follow(run)
    finished = [event for event in events if isinstance(event, RunFinished)]
    assert [event.status for event in finished] == ["stopped"] and finished[0].step < 100
    assert run.returncode == 0 and not stop_file(tmp_path).exists()
    assert events[-1].message == "the training processes have ended (exit code 0)"
    assert not run.stop() and run.drain() == []


def test_processes_that_die_without_finishing_end_as_failed_with_their_output(tmp_path: Path) -> None:
    run = LaunchRunner()
    run.start(LaunchRequest([sys.executable, str(_script(tmp_path, "crash.py", CRASH)), str(tmp_path)], tmp_path,
                            env=python_env(), cwd=ROOT))
    events = _follow(run)
    assert [event.step for event in events if isinstance(event, Progress)] == [1, 2]
    log, finished = events[-2], events[-1]
    assert log.level == "error" and log.message.startswith("the training processes ended with exit code 1; the "
                                                           f"last lines of {tmp_path / 'launch.log'}:\n")
    assert "[rank1]: Traceback (most recent call last):" in log.message
    assert finished == RunFinished(status="failed", step=2, time=finished.time, message=(
        "the training processes ended (exit code 1) without finishing the run: torch.OutOfMemoryError: CUDA out "
        "of memory. Tried to allocate 2.00 GiB"))


def test_the_cause_of_a_failure_is_the_rank_that_was_killed() -> None:
    launcher = textwrap.dedent("""\
        RuntimeError: [gloo] Read error: Connection reset by peer
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
        Root Cause (first observed failure):
        [0]:
          rank      : 1 (local_rank: 1)
          exitcode  : -9 (pid: 14259)  (SIGKILL)
          traceback : Signal 9 (SIGKILL) received by PID 14259
    """)
    assert failure_cause(launcher) == "rank 1 ended with exit code -9 (SIGKILL)"
    assert failure_cause("error: model.source: no such folder\nerror: model.source: no such folder\n") == \
        "error: model.source: no such folder"
    assert failure_cause("subprocess.CalledProcessError: Command '...' returned non-zero exit status 1.") == ""


# ---------------------------------------------------------------------- through the app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):
    """(client, runner, workdir, form values that train the prebuilt demo) of an app with CPU processes offered."""
    from gradio_client import Client

    from ui.page import build_app
    from ui.served import allowed_paths

    workdir = tmp_path_factory.mktemp("studio")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CPU_PROCESSES_ENV, "1")
        runner = AppRunner(TrainingRunner())
        blocks = build_app(runner, workdir, [demo_dir])
    blocks.queue().launch(prevent_thread_lock=True, server_port=_free_port(), allowed_paths=allowed_paths(workdir),
                          quiet=True)
    form = {"model_source": str(demo_dir / "flux2"), "dataset_path": str(demo_dir / "dataset"),
            "sample_prompts": "shapez a red circle", "sample_every_steps": 0, "sample_steps": "2",
            "train_max_steps": 200}
    try:
        yield Client(blocks.local_url, verbose=False, download_files=False), runner, workdir, form
    finally:
        runner.launch.stop()
        runner.launch.join(60)
        blocks.close()


class Poller:
    """The Run view through /poll and /samples: the newest value of each output (an unchanged one comes back as a
    skip)."""

    def __init__(self, client: object) -> None:
        self.client = client
        self.status = self.progress = self.log = ""
        self.plot: dict | None = None
        self.gallery: list = []

    def poll(self) -> str:
        status, progress, plot, log, *_ = self.client.predict(api_name="/poll")
        self.status, self.progress = status, progress
        self.plot = plot if isinstance(plot, dict) and "data" in plot else self.plot
        self.gallery = self.client.predict(api_name="/samples")
        self.log = log if isinstance(log, str) else self.log
        return status

    def until(self, done: object, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.poll()):
                return self.status
            time.sleep(0.3)
        raise AssertionError(f"status {self.status!r}\n{self.log[-3000:]}")


def _step(status: str) -> int:
    return int(status.split()[2].split("/")[0]) if status.startswith("running: step") else 0


@pytest.mark.slow
def test_two_cpu_processes_train_the_demo_in_the_run_view_and_stop_together(app: tuple) -> None:
    client, runner, workdir, form = app
    out = workdir / "two"
    job = dict(form, output_dir=str(out))
    planned = client.predict(**job, multi_gpu_devices=[CPU], multi_gpu_processes=2, api_name="/multi_gpu_plan")
    assert planned == "**Plan:** 2 CPU processes (testing) — ddp (auto: no GPU memory size to judge against)"
    started, problems, *_ = client.predict(**job, multi_gpu_devices=[CPU], multi_gpu_processes=2,
                                       api_name="/multi_gpu_start")
    assert started == "started on 2 CPU processes (testing) (ddp): 200 steps", problems
    assert spec_distributed(out / "job.toml") == "auto"  # the form's job, saved before the launch

    # one training at a time: the in-process Start, a second launch and sample-now are refused meanwhile
    assert client.predict(**job, api_name="/start")[0] == ALREADY_RUNNING
    assert client.predict(**job, multi_gpu_devices=[CPU], multi_gpu_processes=2,
                          api_name="/multi_gpu_start")[0] == ALREADY_RUNNING
    assert client.predict(api_name="/validate_now")[0].startswith("sample now and save now reach runs in this process")

    view = Poller(client)
    view.until(lambda status: _step(status) >= 2 or status.startswith(("failed", "completed", "stopped")))
    assert _step(view.status) >= 2, view.log
    assert f"step {_step(view.status)}/200" in view.progress and "loss " in view.progress
    assert "distributed: 2 processes, ddp" in view.log and "command: " in view.log
    assert client.predict(api_name="/stop") == "stopping: the run ends after the current step and saves the LoRA"

    status = view.until(lambda status: status.startswith(("stopped", "failed", "completed")))
    assert status == f"stopped: LoRA saved to {out / 'demo_lora.safetensors'}", view.log
    assert runner.launch.join(120) and runner.launch.returncode == 0  # both ranks ended by themselves
    view.until(lambda status: "the training processes have ended (exit code 0)" in view.log, timeout=10)
    events = EventsFollower(out / "events.jsonl").read()
    finished = [event for event in events if isinstance(event, RunFinished)]
    assert [event.status for event in finished] == ["stopped"] and finished[0].step < 200
    assert finished[0].step in dict(saved_states(out))  # the state to resume from
    assert view.plot and {row[2] for row in view.plot["data"]} >= {"loss", "smoothed"}
    assert len(view.gallery) == 1 and view.gallery[0]["caption"] == f"step {finished[0].step}: shapez a red circle"
    assert not stop_file(out).exists()


def spec_distributed(path: Path) -> str:
    return load_spec(path).train.distributed


def test_a_crashed_launch_shows_as_failed_with_its_stderr_tail(app: tuple, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client, runner, workdir, form = app
    assert runner.launch.join(120)  # the previous test's run has ended
    out = workdir / "crash"
    JsonlWriter(out / "events.jsonl")(RunFinished(status="completed", step=60))  # an earlier run's, not this one's
    script = _script(tmp_path, "crash.py", CRASH)
    # the launch command replaced by a stand-in that dies like an out-of-memory rank (the job's folder is its arg)
    monkeypatch.setattr(multi_gpu, "training_command",
                        lambda job, found, resume, port: [sys.executable, str(script), str(Path(job).parent)])
    started, *_ = client.predict(**dict(form, output_dir=str(out)), multi_gpu_devices=[CPU], multi_gpu_processes=2,
                                api_name="/multi_gpu_start")
    assert started.startswith("started on 2 CPU processes"), started
    view = Poller(client)
    status = view.until(lambda status: status.startswith(("failed", "completed", "stopped")), timeout=60)
    assert status == ("failed: the training processes ended (exit code 1) without finishing the run: "
                      "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "step 2/9" in view.progress
    assert f"the training processes ended with exit code 1; the last lines of {out / 'launch.log'}:" in view.log
    assert "[rank1]: Traceback (most recent call last):" in view.log
    assert os.path.isfile(out / "job.toml")


# Ends at once as a finished run does; writes down whether it was asked to resume (the launch command's last word).
QUICK = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from trainer.events import JsonlWriter, RunFinished, RunStarted
    out = Path(sys.argv[1])
    (out / "launched.txt").open("a").write(sys.argv[2] + "\\n")
    emit = JsonlWriter(out / "events.jsonl")
    emit(RunStarted(max_steps=200, output_dir=str(out), family="flux2", flavour="demo"))
    emit(RunFinished(status="stopped", step=3))
""")


def test_a_start_on_several_gpus_over_a_stopped_run_asks_as_start_does(app: tuple, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.checkpoint import STATE_SUFFIX

    client, runner, workdir, form = app
    assert runner.launch.join(120)  # the previous tests' runs have ended
    out = workdir / "stopped"
    (out / "state").mkdir(parents=True)
    (out / "state" / f"step000003{STATE_SUFFIX}").write_bytes(b"")  # the offer reads the name only
    JsonlWriter(out / "events.jsonl")(RunFinished(status="stopped", step=3))
    script = _script(tmp_path, "quick.py", QUICK)
    monkeypatch.setattr(multi_gpu, "training_command", lambda job, found, resume, port: [
        sys.executable, str(script), str(Path(job).parent), "resume" if resume else "new"])
    job = dict(form, output_dir=str(out), multi_gpu_devices=[CPU], multi_gpu_processes=2)

    # Start asks, as the single-GPU Start does, in the status line; nothing is written or moved.
    status, problems = client.predict(**job, api_name="/multi_gpu_start")  # its answers show: the browser test
    assert status == (f"not started: a run stopped at step 3 in {out}: choose Continue at step 3 (Resume) to go on "
                      "with it, or Start a new run to move it to earlier_runs/ and start at step 0")
    assert problems["visible"] is True and problems["value"] == status
    assert client.predict(api_name="/poll")[0] == status
    assert client.predict(**form, output_dir=str(out), api_name="/start")[0] == status  # the same question
    assert sorted(path.name for path in out.iterdir()) == ["events.jsonl", "state"]

    # Continue resumes it on several GPUs; Start a new run starts anew, and the app itself moves nothing (the
    # session sets the stopped run aside once its first step is about to train: test_run_workflow).
    for api_name, expected, said in (("/multi_gpu_resume", "resumed on 2 CPU processes", "resume"),
                                     ("/multi_gpu_start_new", "started on 2 CPU processes", "new")):
        assert client.predict(**job, api_name=api_name)[0].startswith(expected)
        assert runner.launch.join(60) and (out / "launched.txt").read_text().split()[-1] == said
        assert not (out / "earlier_runs").exists() and (out / "state" / f"step000003{STATE_SUFFIX}").exists()
