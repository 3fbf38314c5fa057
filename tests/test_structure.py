"""The code's shape, checked by the same scripts a developer runs: no import cycles among the modules of trainer/,
ui/ and app.py (imports inside functions and of parent packages counted), no function over 80 lines there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles() -> None:
    script = _script("import_cycles")
    graph = script.import_graph()
    assert "trainer.estimator.core" in graph and "ui.page" in graph  # it read the packages
    assert script.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_package(tmp_path: Path) -> None:
    """`from ui import form` imports ui/__init__.py: a package that imports its own modules makes a cycle."""
    script = _script("import_cycles")
    (tmp_path / "ui").mkdir()
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("")
    (tmp_path / "ui" / "__init__.py").write_text("def build():\n    from ui import tab\n")
    (tmp_path / "ui" / "tab.py").write_text("from ui import form\n")
    (tmp_path / "ui" / "form.py").write_text("import os\n")
    assert script.cycles(script.import_graph(tmp_path)) == [["ui", "ui.tab"]]


def test_no_function_over_80_lines() -> None:
    script = _script("long_functions")
    lengths = script.function_lengths()
    assert len(lengths) > 500  # it read the code
    assert [where for length, where in lengths if length > script.LIMIT] == []


def test_every_runner_implements_the_one_interface() -> None:
    from trainer.runners.app import AppRunner
    from trainer.runners.base import Runner
    from trainer.runners.caption import CaptionRunner
    from trainer.runners.launch import LaunchRunner
    from trainer.runners.process import ProcessRunner
    from trainer.runners.thread import TrainingRunner

    runners = [TrainingRunner(), ProcessRunner(), LaunchRunner(), CaptionRunner(), AppRunner(TrainingRunner())]
    assert all(isinstance(runner, Runner) for runner in runners)
    assert all(runner.state.action is None and runner.drain() == [] for runner in runners)
