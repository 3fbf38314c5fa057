"""Which folders may be read and written: the app's allowed folders, and the rule for files found in a folder.

The app serves whoever can reach it (everyone with the share link, the network with --listen), and several of its
handlers take a path typed into the page: the image folder (dataset check, caption editor, captioning), a job file
to load or save, every path of a job that Start hands to the trainer (edit pairs' reference folders and sample
reference images included), every folder a run writes into, and the sample images the gallery shows. Each
of them goes through `Folders.check` first, so `../..`, an absolute path elsewhere or a link that leads out of the
chosen folders is refused with a message that says which folders are allowed and how to add one.

Files found inside a data folder (images, captions, masks, edit pairs' references) follow one rule wherever they
are read — the page's dataset check and caption editor, the CLI's health check, captioning and training alike:
`leads_out` refuses a file whose link leads outside the folder it was found in. Pure python.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.spec import JobSpec, is_local_path

ADD_A_FOLDER = "start the app with --allow FOLDER to use another folder"


class PathRefused(UserError):
    """A path resolves outside the folders the app may use; the message names it and the allowed folders."""


@dataclass(frozen=True)
class Folders:
    """The workdir (demo, outputs, saved jobs) and the folders the person who started the app allowed."""

    workdir: Path
    extra: tuple[Path, ...] = ()

    @classmethod
    def of(cls, workdir: str | Path, extra: Iterable[str | Path] = ()) -> Folders:
        # Resolved once: a root that is itself a link counts as where it points, as every checked path does.
        return cls(Path(workdir).expanduser().resolve(), tuple(Path(p).expanduser().resolve() for p in extra))

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys((self.workdir, *self.extra)))

    def describe(self) -> str:
        return ", ".join(str(root) for root in self.roots)

    def absolute(self, text: str | Path) -> Path:
        """The path as typed, a relative one taken from the workdir, with `..` and links resolved."""
        path = Path(str(text).strip()).expanduser()
        return (path if path.is_absolute() else self.workdir / path).resolve()

    def allows(self, path: str | Path) -> bool:
        try:
            self.check(path, "path")
        except PathRefused:
            return False
        return True

    def check(self, text: str | Path, what: str) -> Path:
        """The resolved path when it lies inside an allowed folder (links followed); raises PathRefused naming
        `what` (e.g. "image folder"), the path as typed, where it leads and the allowed folders."""
        try:
            resolved = self.absolute(text)
        except (OSError, RuntimeError):  # a loop of links: it leads nowhere, so nowhere allowed
            raise PathRefused(f"refused: the {what} {str(text).strip()!r} is a loop of links") from None
        if any(resolved.is_relative_to(root) for root in self.roots):
            return resolved
        typed = str(text).strip()
        leads = "" if typed == str(resolved) else f" (it leads to {resolved})"
        raise PathRefused(f"refused: the {what} {typed!r}{leads} is outside the folders this app may use "
                          f"({self.describe()}); {ADD_A_FOLDER}")

    def check_folder_to_write(self, text: str | Path, what: str) -> Path:
        """Like `check`, for a folder the app writes into: each link directly inside it must stay inside too, as
        the run appends to or creates files through them (events.jsonl, launch.log, STOP, state/, samples/,
        logs/, cache/); what lies deeper is only ever replaced atomically, which never writes through a link."""
        folder = self.check(text, what)
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if entry.is_symlink():
                    self.check(entry, f"{what} entry")
        return folder

    def problems(self, paths: Sequence[tuple[str, str]], writing: bool = False) -> list[str]:
        """One message per (what, path) that lies outside the allowed folders; `writing`: the paths are folders
        written into, checked with `check_folder_to_write`."""
        check = self.check_folder_to_write if writing else self.check
        found = []
        for what, path in paths:
            try:
                check(path, what)
            except PathRefused as exc:
                found.append(str(exc))
        return list(dict.fromkeys(found))


def leads_out(path: Path, folder: Path) -> Path | None:
    """Where `path`, an entry of `folder`, really is when a link takes it outside `folder` (links followed on both
    sides); None when it stays inside, the case for every plain file."""
    try:
        target = Path(path).resolve()
    except (OSError, RuntimeError):  # a loop of links leads nowhere inside
        return Path(path)
    return None if target.is_relative_to(Path(folder).resolve()) else target


def spec_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(key, path) of every local file or folder a job reads or writes; hub ids are left out."""
    paths: list[tuple[str, str]] = []
    model = spec.model
    if is_local_path(model.source):
        paths.append(("model.source", model.source))
    # Single-file components, as later spec versions name them; getattr keeps this module working before then.
    # The ComfyUI folder is read too: bare single-file names are looked up in it, and the Model tab lists it.
    comfy: Any = getattr(model, "comfy_models_dir", None)
    if isinstance(comfy, str) and comfy:
        paths.append(("model.comfy_models_dir", comfy))
    for key in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        value: Any = getattr(model, key, None)
        if isinstance(value, str) and value and is_local_path(value):
            paths.append((f"model.{key}", value))
    for index, entry in enumerate(spec.data.datasets):
        paths.append((f"data.datasets[{index}].path", entry.path))
        if entry.masks:
            paths.append((f"data.datasets[{index}].masks", entry.masks))
        if entry.conditioning:  # an edit pair's reference images
            paths.append((f"data.datasets[{index}].conditioning", entry.conditioning))
    optional = [("data.cache_dir", spec.data.cache_dir), ("sample.prompt_library", spec.sample.prompt_library),
                ("lora.init_from", spec.lora.init_from), ("output.comfy_lora_dir", spec.output.comfy_lora_dir)]
    paths += [(key, value) for key, value in optional if value]
    models = [("sample.clip_score_model", spec.sample.clip_score_model),
              ("sample.preview_decoder", spec.sample.preview_decoder)]  # a local folder, or a hub id (left out)
    paths += [(key, value) for key, value in models if is_local_path(value)]
    paths += [(f"sample.reference_images[{index}]", path) for index, path in enumerate(spec.sample.reference_images)]
    paths.append(("output.dir", spec.output.dir))
    return paths


def written_folders(spec: JobSpec) -> list[tuple[str, str]]:
    """(key, folder) of every folder a run of the job writes into; the files it writes there are named from
    output.name, which the spec keeps a plain name."""
    found = [("output.dir", spec.output.dir),
             ("data.cache_dir", spec.data.cache_dir or str(Path(spec.output.dir) / "cache"))]
    if spec.output.comfy_lora_dir:
        found.append(("output.comfy_lora_dir", spec.output.comfy_lora_dir))
    return found
