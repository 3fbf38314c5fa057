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

from trainer.quiet import silence_library_noise  # noqa: E402

silence_library_noise()

import torch  # noqa: E402

torch.set_num_threads(1)


def built_demo() -> Path:
    """The demo built by this code, shared by the test workers and by later runs: built once per key (its code and
    library versions), under a lock, in the temporary folder. Copy it before changing anything in it."""
    from filelock import FileLock

    from trainer.demo import build_demo, demo_key, is_built

    root = Path(tempfile.gettempdir()) / f"flux-lora-studio-demo-{getpass.getuser()}"
    root.mkdir(exist_ok=True)
    folder = root / demo_key()
    with FileLock(str(folder) + ".lock"):
        if not is_built(folder):
            build_demo(folder)
    return folder


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    shutil.copytree(built_demo(), out, dirs_exist_ok=True)  # this worker's own copy: tests may write beside it
    return out


def python_env() -> dict[str, str]:
    """Environment for subprocesses that run the project's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env
