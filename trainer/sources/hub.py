"""Model files from the Hugging Face Hub: only what the flavour needs, progress as events, clear errors.

huggingface_hub does the work: `snapshot_download` with `allow_patterns` fetches only the listed files into its
cache (~/.cache/huggingface/hub, or HF_HOME / HF_HUB_CACHE) and returns the snapshot folder, which then loads
like any local diffusers folder. The token is huggingface_hub's own: HF_TOKEN, else the one `hf auth login` /
`huggingface-cli login` saved; this module never reads, logs or writes it (it only asks whether one exists, to
say which fix applies).

Resuming (checked in huggingface_hub 2.4; tests/test_sources.py runs its snapshot_download against a Hub in
memory): files already complete stay in the cache and a later run downloads only the rest (we never pass
force_download); within one run a refused connection, a timeout or a protocol error is retried and resumed from the
byte it reached (HTTP Range, 5 tries), a connection reset fails the run at once. A file interrupted by stopping the
program starts again from zero on the next run: 2.4 writes each file to a process-unique temporary name and deletes
it on failure. Offline (HF_HUB_OFFLINE=1 or no network), a repo whose needed files are all cached loads from the
cache.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.events import DownloadProgress, Event, LogMessage, PhaseChanged
from trainer.registry import Flavour
from trainer.sources import SLOTS, ModelFiles

# Weight formats diffusers does not need when safetensors are there (some repos carry both).
_IGNORED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]
_EVERY_SECONDS = 0.5  # progress events at most this often (plus the last one)


def needed_patterns(flavour: Flavour, skip: tuple[str, ...] = (), files: ModelFiles | None = None) -> list[str]:
    """The repo files a load needs: the pipeline index, every component folder not skipped, and only the
    config of a component that a single file replaces (the repo's root single files are never fetched)."""
    given = (files or ModelFiles()).given()
    patterns = ["model_index.json"]
    for component in flavour.components:
        if component in skip:
            continue
        patterns.append(f"{component}/config.json" if component in SLOTS and component in given else f"{component}/*")
    return patterns


def _token_hint() -> str:
    from huggingface_hub import get_token

    if get_token() is None:
        return "no Hugging Face token is set on this machine"
    return "the token in use (HF_TOKEN or the saved login) has no access to it yet"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def explain(error: BaseException, repo_id: str) -> UserError | None:
    """One clear UserError for a huggingface_hub failure, saying what to do; None for errors of another kind."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{repo_id}"
    local = "or point model.source at a local diffusers folder that holds the model"
    if isinstance(error, errors.GatedRepoError):
        return UserError(f"model.source: '{repo_id}' is a gated model and {_token_hint()}. Accept its licence on "
                         f"{page} (logged in to Hugging Face), then log in here with `hf auth login` (or "
                         f"`huggingface-cli login`) or set HF_TOKEN to a read token of that account; {local}.")
    if isinstance(error, errors.RepositoryNotFoundError):
        return UserError(f"model.source: no Hugging Face repo '{repo_id}' is visible ({_token_hint()}). Check the "
                         f"name; if it is private or gated, log in with `hf auth login` (or `huggingface-cli "
                         f"login`) or set HF_TOKEN; {local}.")
    if isinstance(error, errors.RevisionNotFoundError):
        return UserError(f"model.source: '{repo_id}' has no such revision; {local}.")
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face Hub cannot be reached (no network?)"
        return UserError(f"model.source: cannot download '{repo_id}': {why}, and the files this job needs are not "
                         f"all in the Hugging Face cache. Connect to the internet (and unset HF_HUB_OFFLINE) to "
                         f"download them once, {local}.")
    if isinstance(error, errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            from huggingface_hub import get_token

            # the Hub answers 401 to a repo request only for a token it does not accept (else: RepositoryNotFound)
            hint = ("the token in use (HF_TOKEN or the saved login) is not valid" if status == 401 and get_token()
                    else _token_hint())
            return UserError(f"model.source: Hugging Face refused '{repo_id}' ({status}: {hint}). Log in "
                             f"with `hf auth login` or set HF_TOKEN to a valid read token, and accept the licence "
                             f"on {page} if it has one; {local}.")
        return UserError(f"model.source: downloading '{repo_id}' failed ({status or 'no answer'}); try again "
                         f"later, {local}.")
    if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.startswith(("httpx", "httpcore")):
        return UserError(f"model.source: downloading '{repo_id}' failed ({type(error).__name__}: {error}); check "
                         f"the network and run again (finished files are kept), {local}.")
    return None


class _Tracker:
    """Sums what huggingface_hub's progress bars report and sends it as throttled DownloadProgress events."""

    def __init__(self, repo_id: str, emit: Callable[[Event], None]) -> None:
        self.repo_id, self.emit = repo_id, emit
        self.lock = threading.Lock()
        self.bytes_done = self.bytes_total = self.files_done = self.files_total = 0
        self.last = 0.0

    def update(self, bar: Any, final: bool = False) -> None:
        with self.lock:
            if bar.unit == "B":
                # snapshot_download keeps two byte bars: bytes written ("Reconstructing") and bytes received from
                # the network ("Downloading bytes", whose total it inflates as a display trick); the written ones
                # are what the files need.
                if str(bar.desc).startswith("Downloading bytes"):
                    return
                self.bytes_done, self.bytes_total = int(bar.n), int(bar.total or 0)
            else:
                self.files_done, self.files_total = int(bar.n), int(bar.total or 0)
            now = time.monotonic()
            if not final and now - self.last < _EVERY_SECONDS:
                return
            self.last = now
            event = DownloadProgress(repo_id=self.repo_id, downloaded_bytes=self.bytes_done,
                                     total_bytes=self.bytes_total, files_done=self.files_done,
                                     files_total=self.files_total)
        self.emit(event)

    def bar_class(self) -> type:
        from tqdm.auto import tqdm

        tracker = self

        class _Bar(tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                kwargs["file"] = io.StringIO()  # drawn nowhere: the events carry the progress
                kwargs["disable"] = False  # a disabled tqdm stops counting
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                shown = super().update(n)
                tracker.update(self)
                return shown

            def close(self) -> None:
                tracker.update(self, final=True)
                super().close()

        return _Bar


def fetch(repo_id: str, patterns: list[str], emit: Callable[[Event], None] | None = None) -> Path:
    """The local snapshot folder of `repo_id` holding the files matching `patterns` (downloaded if needed)."""
    import huggingface_hub

    kwargs: dict[str, Any] = {"allow_patterns": patterns, "ignore_patterns": _IGNORED}
    if emit is not None:
        emit(PhaseChanged(phase="downloading", detail=f"{repo_id} ({', '.join(patterns)})"))
        kwargs["tqdm_class"] = _Tracker(repo_id, emit).bar_class()
    try:
        folder = huggingface_hub.snapshot_download(repo_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one message; others pass unchanged
        clear = explain(exc, repo_id)
        if clear is None:
            raise
        raise clear from exc
    if emit is not None:
        emit(LogMessage(level="info", message=f"model files of {repo_id} are in {folder}"))
    return Path(folder)
