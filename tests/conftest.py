"""Shared fixtures: the demo (tiny pre-trained models + dataset) is built once and reused while its key holds."""

from __future__ import annotations

import getpass
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
# The demo's tiny matrices run faster on one thread than split over two (measured: ~1.7x on this suite).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# The demo's pre-trained models are built once per key (their code and library versions) in this folder, shared by
# the test workers, the apps they start (which inherit it) and later runs.
from trainer.demo import CACHE_ENV  # noqa: E402

os.environ.setdefault(CACHE_ENV, str(Path(tempfile.gettempdir()) / f"flux-lora-studio-demo-{getpass.getuser()}"))

from trainer.quiet import silence_library_noise  # noqa: E402

silence_library_noise()

import torch  # noqa: E402

torch.set_num_threads(1)


# The longest files (1-3 minutes each, measured by --durations) start first, one on each worker: with xdist's
# per-file schedule in collection order (--no-loadscope-reorder) they no longer end the run alone on one worker.
# xdist hands each worker its next file while it still runs one, so the first four are the first two on each.
SLOW_FILES_FIRST = (
    "test_browser_session.py",
    "test_browser_quickstart.py",
    "test_multi_gpu.py",
    "test_browser_job_bar.py",
    "test_browser.py",
    "test_gpu_proof.py",
    "test_ui_multi_gpu.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own tests' order


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    from trainer.demo import cached_build

    # Built once per key for every worker and later run; this worker's own copy, as tests may write beside it.
    shutil.copytree(cached_build(Path(os.environ[CACHE_ENV])), out, dirs_exist_ok=True)
    return out


def python_env() -> dict[str, str]:
    """Environment for subprocesses that run the project's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_demo_session(demo_dir: Path, overrides: list[str]) -> tuple[object, list[str]]:
    """Train the demo job with `overrides` in this process (no samples, no training state); the ended Session and
    the log messages it emitted."""
    from trainer.events import LogMessage
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    spec = resolve_paths(load_spec(demo_dir / "job.toml", [
        "sample.prompts=[]", "output.save_state=false", *overrides]), demo_dir)
    messages: list[str] = []
    session = Session(spec, emit=lambda e: messages.append(e.message) if isinstance(e, LogMessage) else None)
    try:
        session.run()
    finally:
        session.end()
    return session, messages
