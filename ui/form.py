"""Form values ↔ job spec, by key, never by position.

Every control of the job form is registered under a key: `section.key` for a spec field, `dataset.key` for a
field of the dataset the form edits, which lives at `data.datasets[0]` in the spec (further datasets of a loaded
job, e.g. regularisation images, are kept as loaded). Handlers receive a dict key → value and turn it into a
nested dict that `parse_spec` validates. Pure python: no gradio import.

A spec key left unset (None: "the strategy decides", "the flavour's default") stays unset through the form: optional
numbers are text boxes that may be empty, the low-VRAM menus have a FROM_STRATEGY entry, and the blocks-to-swap
slider counts only while its switch (a form key of its own, see SWITCHES) is on.
"""

from __future__ import annotations

import inspect
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.demo import demo_job_toml
from trainer.spec import (
    QUANTISED_PRECISIONS,
    TRAINING_GUIDANCE_KEYS,
    JobSpec,
    Problem,
    SpecError,
    deep_merge,
    parse_spec,
)

DATASET = "dataset."
PROMPT_SEPARATOR = "|"

# Order = order of the controls in the tabs.
FORM_KEYS: tuple[str, ...] = (
    # Model
    "model.family", "model.flavour", "model.source", "model.comfy_models_dir", "model.transformer", "model.vae",
    "model.text_encoder", "model.text_encoder_2", "model.base_precision", "model.text_encoder_precision",
    "model.modulation_precision",
    # Dataset & Captioning
    "dataset.path", "dataset.trigger", "dataset.caption_strategy", "dataset.instance_prompt", "dataset.repeats",
    "dataset.masks", "dataset.conditioning", "dataset.conditioning_match", "data.resolution", "data.caption_dropout",
    "data.prior_loss_weight", "data.eval_holdout",
    "data.bucket_step", "data.max_upscale", "data.min_size", "dataset.crop", "data.cache_latents",
    "data.cache_text_embeddings", "data.cache_dir",
    # Low VRAM
    "lowvram.strategy", "lowvram.vram_gib", "lowvram.override_blocks_to_swap", "lowvram.blocks_to_swap",
    "lowvram.swap_prefetch", "lowvram.pin_memory", "lowvram.gradient_checkpointing", "lowvram.checkpointing_interval",
    "lowvram.cpu_offload_checkpointing", "lowvram.optimizer_offload", "lowvram.fused_backward",
    "lowvram.swap_from", "lowvram.disk_read_gbps", "lowvram.text_encoder_device", "lowvram.empty_cache_every",
    "data.vae_tiling",
    # Training
    "lora.rank", "lora.alpha", "lora.dropout",
    "train.optimizer", "train.learning_rate", "train.weight_decay",
    "train.max_steps", "train.batch_size", "train.gradient_accumulation", "train.scheduler",
    "train.warmup_steps", "train.max_grad_norm", "train.mixed_precision", "train.seed",
    "train.ema_decay", "train.ema_device", "train.compile",
    "sample.prompts", "sample.reference_images", "sample.prompt_library", "sample.every_steps",
    "output.dir", "output.name", "output.save_every_steps", "output.keep_last", "output.save_state",
    "output.log_with", "output.formats", "output.comfy_lora_dir",
    # Advanced
    "advanced.timestep_sampling", "advanced.logit_mean", "advanced.logit_std", "advanced.mode_scale",
    "advanced.shift",
    "advanced.auto_shift", "advanced.loss_weighting", "advanced.min_timestep", "advanced.max_timestep",
    "advanced.guidance_mode", "advanced.guidance_value", "advanced.guidance_min", "advanced.guidance_max",
    "advanced.tread", "advanced.tread_selection_ratio", "advanced.tread_start_block", "advanced.tread_end_block",
    "lora.type", "lora.init", "lora.init_from", "lora.targets", "advanced.attention",
    "train.eval_every_steps",
    "sample.steps", "sample.guidance", "sample.seed", "sample.resolution", "sample.use_ema",
    "sample.clip_score_model", "sample.preview_every", "sample.preview_decoder",
)

# Optional numbers, shown as text boxes: empty means "not set" (the flavour's default). gr.Number cannot be
# empty in the browser (its frontend turns an empty value into 0); pydantic parses the text and names the field.
OPTIONAL_KEYS = frozenset({"sample.steps", "sample.guidance", "lowvram.vram_gib", "lowvram.swap_prefetch",
                           "lowvram.checkpointing_interval", "lowvram.disk_read_gbps", "lowvram.empty_cache_every",
                           "train.ema_decay", "sample.resolution"})
# Single-file paths and the ComfyUI folder: empty means "from model.source" (no folder), the spec's default; an
# empty reference folder means no edit pairs, an empty ComfyUI loras folder no copy. An empty box leaves the key
# out of the spec dict, so a job without these keys still has none after the form.
UNSET_WHEN_EMPTY = frozenset({"model.comfy_models_dir", "model.transformer", "model.vae", "model.text_encoder",
                              "model.text_encoder_2", "dataset.conditioning", "output.comfy_lora_dir"})
# Edit pairs: how references are cut counts only beside a reference folder (the spec refuses it alone), so the
# radio's value is left out of the spec while the folder is empty, and an unset one shows the spec's default.
CONDITIONING_MATCH_KEY = "dataset.conditioning_match"
DEFAULT_CONDITIONING_MATCH = "strict"
# Sample reference images: one path for every prompt, or one per prompt in the prompts' order, separated alike.
REFERENCE_IMAGES_KEY = "sample.reference_images"
# Low-VRAM overrides are unset (None) unless the user sets them: the strategy then decides. Their menus name that
# state, so a job that leaves a key to the strategy still leaves it unset after a trip through the form.
FROM_STRATEGY = "from strategy"
ON, OFF = "on", "off"
TRISTATE_KEYS = frozenset({"lowvram.pin_memory", "lowvram.gradient_checkpointing",
                           "lowvram.cpu_offload_checkpointing", "lowvram.optimizer_offload",
                           "lowvram.fused_backward"})
MENU_KEYS = TRISTATE_KEYS | {"lowvram.text_encoder_device", "lowvram.swap_from"}  # menus with a FROM_STRATEGY entry
# Settings whose unset spec value means one of the control's own values (the EMA on the GPU, samples without the
# EMA): the control shows that value for unset, and sends unset for it, so a job without the key keeps none.
UNSET_MEANS: dict[str, Any] = {"train.ema_device": "gpu", "sample.use_ema": False}
# What applies to the EMA only: sent only beside an EMA decay (the spec refuses them alone), like the radio below.
EMA_DECAY_KEY = "train.ema_decay"
EMA_ONLY = ("train.ema_device", "sample.use_ema")
# A slider cannot be empty: its value counts only while its switch (a checkbox with a form key of its own, not a
# spec field) is on. switch key → the key it switches.
SWITCHES: dict[str, str] = {"lowvram.override_blocks_to_swap": "lowvram.blocks_to_swap"}
SWITCHED = {target: switch for switch, target in SWITCHES.items()}
# One pixel area or several, typed as text: "1024" or "512, 768, 1024".
RESOLUTION_KEY = "data.resolution"


def api_name(key: str) -> str:
    """The keyword a key has in the app's API: `train.max_steps` → `train_max_steps`."""
    return key.replace(".", "_")


KEY_BY_API_NAME: dict[str, str] = {api_name(key): key for key in FORM_KEYS}


# ---------------------------------------------------------------------- paths and defaults


def demo_dir(workdir: Path) -> Path:
    """Where the app builds the embedded demo (models and dataset) on the first Start."""
    return Path(workdir) / ".studio" / "demo"


def output_root(workdir: Path) -> Path:
    return Path(workdir) / "output"


def default_job(workdir: Path, family: str = "flux2") -> dict[str, Any]:
    """The demo job with absolute paths: model and dataset in the demo folder, output in WORKDIR/output/<name>."""
    job = tomllib.loads(demo_job_toml(family))
    demo = demo_dir(workdir).resolve()
    job["model"]["source"] = str(demo / job["model"]["source"])
    for entry in job["data"]["datasets"]:
        entry["path"] = str(demo / entry["path"])
    job["output"]["dir"] = str(output_root(workdir).resolve() / job["output"]["name"])
    return job


def field_choices(key: str) -> list[str]:
    """The allowed values of a Literal spec field, read from JobSpec so the menus offer only what works."""
    section, name = key.split(".", 1)
    if section == "dataset":
        from trainer.spec import DatasetEntry

        model: Any = DatasetEntry
    else:
        model = JobSpec.model_fields[section].annotation
    annotation = model.model_fields[name].annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # an optional choice: its choices
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return [str(value) for value in typing.get_args(annotation)]


def target_choices(family: str) -> list[str]:
    """The LoRA target presets of a model family (trainer.adapters.TARGET_PRESETS; no torch)."""
    from trainer.adapters import TARGET_PRESETS

    return list(TARGET_PRESETS.get(family, ()))


def targets_for_family(family: str, targets: str | None) -> str:
    """The targets to keep when the family changes: a preset of another family falls back to the first preset
    ('all'); this family's presets and custom regexes stay."""
    from trainer.adapters import TARGET_PRESETS

    targets = (targets or "").strip()
    choices = target_choices(family)
    other_presets = {preset for presets in TARGET_PRESETS.values() for preset in presets}
    if not targets or (targets in other_presets and targets not in choices):
        return choices[0] if choices else targets
    return targets


# ---------------------------------------------------------------------- conversion


def split_prompts(text: str) -> list[str]:
    return [part.strip() for part in (text or "").split(PROMPT_SEPARATOR) if part.strip()]


def parse_resolution(value: Any) -> int | list[int]:  # noqa: ANN401 - text from the form, or a number from the API
    """Resolution text as the spec takes it: "1024" → 1024, "512, 768, 1024" → [512, 768, 1024].

    A number or a list of numbers (from the API) is taken as it is.

    Raises ValueError saying what was wrong; the range and the multiple of bucket_step are the spec's to check.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size in pixels")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [parse_resolution(part) for part in value]  # type: ignore[misc]
    text = str(value if value is not None else "").strip().strip("[]")
    parts = [part for part in re.split(r"[,;\s]+", text) if part]
    if not parts:
        raise ValueError("empty; give a size in pixels such as 1024, or several: 512, 768, 1024")
    bad = [part for part in parts if not part.isdigit()]
    if bad:
        raise ValueError(f"'{bad[0]}' is not a whole number of pixels; give e.g. 1024, or several: 512, 768, 1024")
    sizes = [int(part) for part in parts]
    return sizes[0] if len(sizes) == 1 else sizes


def format_resolution(value: int | list[int] | None) -> str:
    """The text box's view of a resolution: 1024 → "1024", [512, 768] → "512, 768"."""
    if value is None:
        return ""
    return ", ".join(str(size) for size in value) if isinstance(value, list) else str(value)


def _to_spec_value(key: str, value: Any) -> Any:
    if key in ("sample.prompts", REFERENCE_IMAGES_KEY):
        if isinstance(value, (list, tuple)):  # the API may give a list
            return [str(part).strip() for part in value if str(part).strip()]
        return split_prompts(value)
    if key == RESOLUTION_KEY:
        try:
            return parse_resolution(value)
        except ValueError:
            return "" if value is None else str(value).strip()  # kept as text: parse_form_dict names the problem
    if isinstance(value, str):
        value = value.strip()
    if key in (OPTIONAL_KEYS | UNSET_WHEN_EMPTY) and value in (None, ""):
        return None
    if key in MENU_KEYS:
        if value in (None, "", FROM_STRATEGY):
            return None
        if key in TRISTATE_KEYS:  # anything else stays as given: the spec names it as a bad boolean
            return {ON: True, OFF: False}.get(value, value)
    if key in UNSET_MEANS and value in (None, "", UNSET_MEANS[key]):
        return None
    return value


def _from_spec_value(key: str, value: Any) -> Any:  # noqa: ANN401 - any spec value
    """The control's view of a spec value (the inverse of `_to_spec_value`)."""
    if key in ("sample.prompts", REFERENCE_IMAGES_KEY):
        return f" {PROMPT_SEPARATOR} ".join(value or [])
    if key == CONDITIONING_MATCH_KEY:
        return value or DEFAULT_CONDITIONING_MATCH
    if key == RESOLUTION_KEY:
        return format_resolution(value)
    if key in OPTIONAL_KEYS:
        if value is None:
            return ""
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if key in TRISTATE_KEYS:
        return FROM_STRATEGY if value is None else (ON if value else OFF)
    if key in MENU_KEYS:
        return FROM_STRATEGY if value is None else value
    if key in UNSET_MEANS and value is None:
        return UNSET_MEANS[key]
    if key in UNSET_WHEN_EMPTY:
        return value or ""  # a dropdown/text box shows "" (from source) for an unset path
    if key in SWITCHED and value is None:
        return 0  # the switch is off; the slider shows its lowest position
    return value


def _drop_unused_guidance(data: dict[str, Any]) -> None:
    """The training guidance controls are greyed out for a flavour without a guidance embedding: they send nothing
    (the spec refuses guidance such a flavour would ignore)."""
    model = data.get("model", {})
    try:
        embedded = registry.get_flavour(model.get("family", ""), model.get("flavour", "")).guidance == "embedded"
    except KeyError:
        return  # an unknown flavour: the spec names it
    if not embedded:
        for key in TRAINING_GUIDANCE_KEYS:
            data.get("advanced", {}).pop(key, None)


def _drop_unused_modulation(data: dict[str, Any]) -> None:
    """The modulation precision is greyed out unless FLUX.1 has a quantised base: it sends nothing then (the spec
    refuses a format it would not use)."""
    model = data.get("model", {})
    if not modulation_applies(model.get("family", ""), model.get("base_precision", "")):
        model.pop("modulation_precision", None)


def modulation_applies(family: str, base_precision: str) -> bool:
    """Whether model.modulation_precision is read: FLUX.1's in-block modulation under a quantised base."""
    return family == "flux1" and base_precision in QUANTISED_PRECISIONS


def values_to_dict(values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Nested spec dict from form values (key → value), laid over `base` (a loaded job's fields the form lacks).

    Resolution text the form cannot read ("512, big") stays in as text; `parse_form_dict` names the problem.
    """
    data: dict[str, Any] = deep_merge({}, dict(base or {}))
    datasets = data.setdefault("data", {}).get("datasets") or [{}]
    dataset: dict[str, Any] = dict(datasets[0])
    for key in FORM_KEYS:
        if key not in values or key in SWITCHES:
            continue
        value = _to_spec_value(key, values[key])
        if key in SWITCHED and not values.get(SWITCHED[key], True):
            value = None  # switched off: the strategy decides (without a switch in `values`, the value counts)
        if key.startswith(DATASET):
            target, name = dataset, key.removeprefix(DATASET)
        else:
            section, name = key.split(".", 1)
            target = data.setdefault(section, {})
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    _drop_unused_guidance(data)
    _drop_unused_modulation(data)
    if CONDITIONING_MATCH_KEY in values and not dataset.get("conditioning"):
        dataset.pop("conditioning_match", None)  # no edit pairs: nothing to match
    if EMA_DECAY_KEY in values and data.get("train", {}).get("ema_decay") is None:
        for key in EMA_ONLY:  # no EMA: where it is kept and sampling with it do not apply
            section, name = key.split(".")
            data.get(section, {}).pop(name, None)
    data["data"]["datasets"] = [dataset, *datasets[1:]]
    return data


def parse_form_dict(data: dict[str, Any]) -> JobSpec:
    """`parse_spec` of a dict made by `values_to_dict`: resolution text the form could not read is one more
    problem; every problem is reported at once in one SpecError."""
    problems: list[Problem] = []
    data = deep_merge({}, data)
    section, name = RESOLUTION_KEY.split(".")
    value = data.get(section, {}).get(name)
    if isinstance(value, str):
        try:
            data[section][name] = parse_resolution(value)
        except ValueError as exc:
            problems.append(Problem(RESOLUTION_KEY, f"{exc} (got {value!r})"))
            del data[section][name]  # the rest of the job is still checked
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        raise SpecError([*problems, *exc.errors]) from None
    if problems:
        raise SpecError(problems)
    return spec


def form_to_spec(values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> JobSpec:
    """Validated spec from the form; raises SpecError naming each bad field."""
    return parse_form_dict(values_to_dict(values, base))


def spec_to_values(spec: JobSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Form values (key → value) showing a spec; the first dataset fills the dataset fields."""
    data = spec.to_dict() if isinstance(spec, JobSpec) else dict(spec)
    datasets = data.get("data", {}).get("datasets") or [{}]
    def spec_value(key: str) -> Any:  # noqa: ANN401
        if key.startswith(DATASET):
            return datasets[0].get(key.removeprefix(DATASET))
        section, name = key.split(".", 1)
        return data.get(section, {}).get(name)

    values: dict[str, Any] = {}
    for key in FORM_KEYS:
        if key in SWITCHES:
            values[key] = spec_value(SWITCHES[key]) is not None
        else:
            values[key] = _from_spec_value(key, spec_value(key))
    return values


def hidden_fields(spec: JobSpec) -> dict[str, Any]:
    """What a spec holds beyond the form's controls (datasets after the first included), kept so a loaded job
    round-trips."""
    return spec.to_dict()


# ---------------------------------------------------------------------- handlers by keyword


def keyword_handler(fn: Callable[[dict[str, Any]], Any], extra: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Wrap `fn(values)` as a function of keyword arguments named by `api_name`, for gradio's `inputs_kwargs`.

    The API then lists every parameter by name (`train_max_steps`, ...), each defaulting to its control's value.
    `extra` names further inputs (states) that are passed through under their own names. A generator `fn`
    gives a generator handler (its yields stream to the outputs).
    """

    def values_of(kwargs: dict[str, Any]) -> dict[str, Any]:
        values = {KEY_BY_API_NAME[name]: value for name, value in kwargs.items() if name in KEY_BY_API_NAME}
        values.update({name: kwargs[name] for name in extra if name in kwargs})
        return values

    if inspect.isgeneratorfunction(fn):  # gradio streams a generator's updates only when it sees one

        def handler(**kwargs: Any) -> Any:
            yield from fn(values_of(kwargs))
    else:

        def handler(**kwargs: Any) -> Any:
            return fn(values_of(kwargs))

    handler.__name__ = getattr(fn, "__name__", "handler")
    handler.__doc__ = fn.__doc__
    return handler


def values_by_key(fields: Mapping[str, Any], by_component: Mapping[Any, Any]) -> dict[str, Any]:
    """Key → value from gradio's component → value dict (a handler whose inputs are a set of components)."""
    return {key: by_component[component] for key, component in fields.items() if component in by_component}
