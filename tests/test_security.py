"""Nobody let in: no file we read can run code (never a pickle), and hub tokens never reach what a run writes."""

from __future__ import annotations

import ast
import pickle  # noqa: S403 - to build the malicious files the trainer must refuse
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from trainer.checkpoint import load_training_state, state_path
from trainer.errors import UserError
from trainer.events import Event
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths

SOURCES = [ROOT / "app.py", *sorted((ROOT / "trainer").rglob("*.py")), *sorted((ROOT / "ui").rglob("*.py")),
           *sorted((ROOT / "bench").rglob("*.py"))]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_source_tree_loads_no_pickle_and_trusts_no_remote_code() -> None:
    problems: list[str] = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                             if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where}:{node.lineno} imports from {node.module}")
        for call in _calls(tree):
            name = _dotted(call.func)
            weights_only = _keyword(call, "weights_only")
            if name.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value):
                problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            if name.endswith(("torch.save", "np.load", "numpy.load")):
                problems.append(f"{where}:{call.lineno} {name}: pickles; write safetensors (and JSON)")
            remote = _keyword(call, "trust_remote_code")
            if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                problems.append(f"{where}:{call.lineno} trust_remote_code may be true")
    assert not problems, "\n".join(problems)
    assert len(SOURCES) > 50  # the walk found the tree


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload(marker)}, handle)
    return path


def test_pickles_in_place_of_a_state_a_lora_or_model_weights_never_run(demo_dir: Path, tmp_path: Path) -> None:
    from trainer import registry
    from trainer.adapters import _read_adapter_file
    from trainer.sources.assemble import load_pipeline

    marker = tmp_path / "code ran"
    with pytest.raises(UserError, match="the saved training state cannot be read"):
        load_training_state(_plant(state_path(tmp_path / "out", 9), marker))
    with pytest.raises(UserError, match="lora.init_from: .* is not a readable safetensors file"):
        _read_adapter_file(torch.nn.Linear(2, 2), _plant(tmp_path / "lora.safetensors", marker))

    model = tmp_path / "model"  # a diffusers folder whose transformer weights are a pickle, as old repos ship them
    shutil.copytree(demo_dir / "flux2", model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    _plant(model / "transformer" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(Exception, match="safetensors"):  # noqa: PT011 - diffusers' own error, which names the format
        load_pipeline(str(model), registry.get_flavour("flux2", "demo"), torch.float32)
    assert not marker.exists()


# ---------------------------------------------------------------------- secrets

FAKE_TOKEN = "hf_FakeTokenForLeakTests0123456789abcd"


def _written(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_hub_token_never_reaches_files_events_or_messages(demo_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    from tests.fake_hub import FakeHub, serving

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert huggingface_hub.get_token() == FAKE_TOKEN  # the token the hub client would send
    events: list[Event] = []
    out = tmp_path / "out"
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [
        "train.max_steps=2", "output.save_every_steps=1", "sample.every_steps=2", "sample.steps=2",
        'output.formats=["diffusers", "comfyui"]', 'output.log_with=["tensorboard"]', f"output.dir='{out}'"]),
        demo_dir)
    session = Session(spec, emit=events.append)
    try:
        session.run()
    finally:
        session.end()

    failing = tmp_path / "hub"  # the same job from a gated hub repo the token cannot open
    repo = "black-forest-labs/FLUX.2-klein-base-4B"
    hub_spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": repo}),
                                       "output": spec.output.model_copy(update={"dir": str(failing)})})
    session = Session(hub_spec, emit=events.append)
    with (serving(FakeHub(repo, demo_dir / "flux2", refuse="gated"), tmp_path / "cache"),
          pytest.raises(UserError, match="gated model and the token in use") as caught):
        session.run()
    session.end()

    files = {**_written(out), **_written(failing)}
    assert any(p.suffix == ".safetensors" for p in files) and any("tfevents" in p.name for p in files)
    leaks = [str(p) for p, data in files.items() if FAKE_TOKEN.encode() in data]
    leaks += [repr(e) for e in events if FAKE_TOKEN in repr(e)]
    captured = capfd.readouterr()
    leaks += [name for name, text in (("stdout", captured.out), ("stderr", captured.err), ("error", str(caught.value)))
              if FAKE_TOKEN in text]
    assert not leaks
