"""The dataset check behind the tab's button: the health check and the bucket plan a run would make, in plain
python (no torch, no gradio). It reads every image once, so a big folder takes seconds: the tab shows
"checking…" first."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.spec import SpecError, resolve_paths
from ui import form
from ui.words import all_in_page_words, named

PREVIEW_CAPTIONS = 5
CHECKING = "checking…"
# Only the data section, the batch settings and whether the flavour takes edit pairs' references matter for a
# dataset: the form's family and flavour, with a stand-in source (never read); an unknown pair checks as this one.
_ANY_MODEL = {"family": "flux1", "flavour": "dev"}
_UNREAD_SOURCE = "unused-by-the-dataset-check"
_TRAIN_KEYS = ("batch_size", "gradient_accumulation")


@dataclass(frozen=True)
class DatasetCheck:
    """What the check found: `verdict` is the health check's (ok, warnings, will not train) or "not built"
    (the demo dataset, made on the first Start); `line` is the verdict with the counts, `details` markdown,
    `buckets` the bucket plan's report (plain text; empty when nothing could be planned)."""

    verdict: str
    line: str
    details: str
    buckets: str = ""


def check_form(values: dict[str, Any], base: dict[str, Any] | None, workdir: Path, demo_dir: Path,
               labels: Mapping[str, str] | None = None) -> DatasetCheck:
    """Health check and bucket plan of the form's datasets (the first one edited by the form, any others as
    loaded), as a run of the form's job would make them; its messages name the controls by `labels` (key →
    label, as the page shows them)."""
    labels = labels or {}
    data = form.values_to_dict(values, base)
    train = {key: value for key, value in data.get("train", {}).items() if key in _TRAIN_KEYS}
    try:
        spec = resolve_paths(form.parse_form_dict({"model": _model(data.get("model", {})), "data": data["data"],
                                                   "train": train}), workdir)
    except SpecError as exc:
        details = "**The form has problems:**\n" + "\n".join(f"- {problem}"
                                                             for problem in all_in_page_words(exc.errors, labels))
        return DatasetCheck("will not train", "will not train — the form has problems (listed below)", details)
    first = Path(spec.data.datasets[0].path)
    if not first.is_dir() and first.is_relative_to(demo_dir):
        return DatasetCheck("not built", "not built yet — the demo dataset is made on the first Start",
                            f"The demo dataset `{first}` is built on the first Start.")
    return check_spec(spec, labels)


def _model(model: dict[str, Any]) -> dict[str, str]:
    """The form's family and flavour when the registry knows them, else any hub flavour."""
    from trainer import registry

    family, flavour = str(model.get("family", "")), str(model.get("flavour", ""))
    try:
        registry.get_flavour(family, flavour)
    except (KeyError, ValueError):
        return dict(_ANY_MODEL)
    return {"family": family, "flavour": flavour, "source": _UNREAD_SOURCE}


def check_spec(spec: Any, labels: Mapping[str, str] | None = None) -> DatasetCheck:  # noqa: ANN401 - a JobSpec
    """What a run does before training (health check, then `plan_training_items`), reported instead of raised;
    the settings it names are named by the `labels` of their controls."""
    from trainer.data.health import check_datasets
    from trainer.data.health_report import usable_images
    from trainer.data.planning import plan_training_items

    health = check_datasets(spec)
    verdict = health.verdict
    labels = labels or {}
    details = [health.markdown(name=lambda key: named(key, labels))]
    buckets = ""
    items: list[Any] = []
    if usable_images(health):
        try:
            items, plan = plan_training_items(spec, health)
        except ValueError as exc:
            verdict = "will not train"
            details.append(f"\n**No bucket plan:** {exc}")
        else:
            buckets = plan.report()
            if not plan.placements:
                verdict = "will not train"
                details.append(f"\n**No image fits any bucket:** lower {named('data.resolution', labels)} or raise "
                               f"{named('data.max_upscale', labels)}.")
            elif plan.skipped and verdict == "ok":
                verdict = "warnings"
                details.append(f"\n{len(plan.skipped)} image placements are skipped by the bucket plan "
                               "(listed below it).")
    details += _caption_preview(spec, items)
    line = f"{verdict} — {health.counts()}"
    return DatasetCheck(verdict, line, "\n".join(details), buckets)


def _caption_preview(spec: Any, items: list[Any]) -> list[str]:  # noqa: ANN401
    """The first captions of the first dataset as training reads them (strategy and trigger applied); `items`
    are the placed ones, an image once per resolution."""
    folder = Path(spec.data.datasets[0].path)
    first = list({item.image_path: item for item in items if item.image_path.parent == folder}.values())
    if not first:
        return []
    lines = ["", "First captions as training reads them:"]
    lines += [f"- `{item.image_path.name}`: {item.caption or '(empty)'}" for item in first[:PREVIEW_CAPTIONS]]
    return lines
