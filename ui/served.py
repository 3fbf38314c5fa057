"""What gradio may serve to the browser by path, and what it must never serve (launch's allowed_paths and
blocked_paths). Pure python.
"""

from __future__ import annotations

from pathlib import Path

from ui.form import demo_dir, output_root
from ui.jobs import LAST_FORM, LastForm


def allowed_paths(workdir: Path) -> list[str]:
    """Folders gradio may serve to the browser by path (launch's allowed_paths): the outputs with their sample
    images, the demo, saved jobs. Nothing else of the workdir, and none of the folders allowed with --allow: the
    app reads those itself, after its own checks, and sends what it shows."""
    workdir = Path(workdir).resolve()
    return [str(output_root(workdir)), str(demo_dir(workdir)), str(workdir / ".studio" / "jobs")]


def blocked_paths(workdir: Path) -> list[str]:
    """Never served, even from a folder gradio otherwise serves (launch's blocked_paths): the remembered form, and
    the app's own environment and history when the workdir is the app's folder (gradio serves returned files from
    the working directory)."""
    workdir = Path(workdir).resolve()
    remembered = LastForm(workdir / ".studio" / LAST_FORM)
    return [str(remembered.path), str(remembered.filled_path), str(workdir / ".venv"), str(workdir / ".git")]
