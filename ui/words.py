"""Messages in the page's own words: a problem the spec names by key ("lora.rank: Input should be greater than or
equal to 1 (got 0)") is shown by the label the page gives that field and the section it belongs to, with the key
and value after it ("Rank (LoRA): must be at least 1 (lora.rank = 0)"). Pure python, no gradio (but in
check_as_typed)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from trainer.spec import Problem

SECTIONS = {"model": "Model", "lora": "LoRA", "data": "Dataset", "train": "Training", "sample": "Samples",
            "output": "Output", "lowvram": "Low VRAM", "advanced": "Advanced", "caption": "Automatic captions"}
# The automatic captions' controls (not the job's: no spec key), by their API names; the Dataset tab labels its
# controls from here.
CAPTION_LABELS = {"caption_model": "Captioning model", "caption_source": "Model source", "caption_trigger": "Trigger",
                  "caption_prefix": "Prefix", "caption_suffix": "Suffix", "caption_max_length": "Max length (tokens)",
                  "caption_batch_size": "Batch size", "caption_overwrite": "Overwrite existing captions"}
# The captioning command's options its messages name (trainer/data/captioners.py), and the page's controls for them.
CAPTION_FLAGS = {"--model": "caption_model", "--source": "caption_source", "--max-length": "caption_max_length",
                 "--batch-size": "caption_batch_size"}
CAPTION_FLAG = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, CAPTION_FLAGS)) + r")(?![\w-])")
IMAGE_FOLDER = "data.datasets[0].path"  # the Dataset tab's Image folder, which the check and the captions read
PROBLEM = re.compile(r"^(?P<key>[a-z_]+(?:\.[a-z_]+|\[\d+\])+): (?P<message>.*)$", re.DOTALL)
GOT = re.compile(r"\s*\(got (?P<value>.*)\)$", re.DOTALL)
BOUNDS = [  # pydantic's words for a number's limits, and the page's
    (re.compile(r"^Input should be greater than or equal to (\S+)$"), "must be at least {}"),
    (re.compile(r"^Input should be greater than (\S+)$"), "must be more than {}"),
    (re.compile(r"^Input should be less than or equal to (\S+)$"), "must be at most {}"),
    (re.compile(r"^Input should be less than (\S+)$"), "must be less than {}"),
]


def labels_of(fields: Mapping[str, object]) -> dict[str, str]:
    """key → the label of its control (the tabs give them; ui.build_app hands them to the Studio)."""
    return {key: label for key, component in fields.items() if (label := getattr(component, "label", None))}


def form_key(key: str) -> str:
    """The form's key of a spec key: the first dataset's fields are `dataset.*` in the form."""
    return re.sub(r"^data\.datasets\[0\]\.", "dataset.", key)


def in_page_words(problem: Problem | str, labels: Mapping[str, str]) -> str:
    """'Label (Section): what is wrong (key = value)' for a problem about a field the page shows (`labels`: key →
    label); else as it is. A spec's structured Problem gives its field and message; a line is read as
    `key: message`."""
    if isinstance(problem, Problem):
        key, message = problem.loc, problem.msg
    else:
        found = PROBLEM.match(problem)
        if not found:
            return problem
        key, message = found.group("key"), found.group("message")
    where = label_of(key, labels)
    if where is None:
        return str(problem)
    got = GOT.search(message)
    if got:
        message = message[:got.start()]
    for pattern, words in BOUNDS:
        if bounded := pattern.match(message):
            message = words.format(bounded.group(1))
            break
    return f"{where}: {message} ({key}{' = ' + got.group('value') if got else ''})"


def label_of(key: str, labels: Mapping[str, str]) -> str | None:
    """'Label (Section)' of the control the page shows for `key` (a spec key, or a captioning control's API name),
    or None when the page has none."""
    label = labels.get(form_key(key))
    if label is None:
        return None
    section = SECTIONS.get(re.split(r"[._]", key, maxsplit=1)[0], "")
    return f"{label} ({section})" if section and section.lower() != label.lower() else label


def named(key: str, labels: Mapping[str, str]) -> str:
    """A control as a sentence names it: 'Batch size (Training, train.batch_size)'; the key alone without one."""
    where = label_of(key, labels)
    if where is None:
        return key
    return f"{where[:-1]}, {key})" if where.endswith(")") else f"{where} ({key})"


def field_problem(key: str, message: str, labels: Mapping[str, str], value: object = None) -> str:  # noqa: ANN401
    """One problem with a control's value in the page's words: 'Label (Section): what is wrong and how to fix it
    (key = value)'; as 'key: message' when the page has no control for it."""
    where = label_of(key, labels)
    shown = "" if value is None else f" = {value!r}" if isinstance(value, str) else f" = {value}"
    return f"{where}: {message} ({key}{shown})" if where else f"{key}: {message}"


def all_in_page_words(problems: Iterable[Problem | str], labels: Mapping[str, str]) -> list[str]:
    return [in_page_words(problem, labels) for problem in problems]


def problems_for(key: str, value: object, defaults: Mapping[str, object], labels: Mapping[str, str]) -> list[str]:
    """The problems of one field's value on its own (the other fields at the form's defaults), in page words."""
    from trainer.spec import SpecError
    from ui import form

    try:
        form.form_to_spec({**defaults, key: value})
    except SpecError as exc:
        return [in_page_words(problem, labels) for problem in exc.errors if form_key(problem.loc) == key]
    return []


# What decides whether a number field's value counts, and its limits: a flavour without a guidance embedding sends no
# training guidance, TREAD's blocks are checked against the flavour's only while it is on.
CONTEXT_KEYS = ("model.family", "model.flavour", "advanced.tread")


def check_as_typed(fields: Mapping[str, object], defaults: Mapping[str, object]) -> None:
    """Every number field of the form checks its own limits as the user types (with the form's flavour and the
    switches it depends on, the rest at the defaults): one warning naming the field, in page words (the Start, Save
    and the estimator still check the whole job)."""
    import gradio as gr

    from ui.form import SWITCHED

    labels = labels_of(fields)
    for key, component in fields.items():
        if not isinstance(component, gr.Number):
            continue
        context = [name for name in (*CONTEXT_KEYS, SWITCHED.get(key)) if name in fields and name != key]

        def problems(value: object, *given: object, key: str = key, context: list[str] = context) -> list[str]:
            return problems_for(key, value, {**defaults, **dict(zip(context, given, strict=True))}, labels)

        warn_as_typed(component, problems, [fields[name] for name in context])


def warn_as_typed(component: object, problems: Callable[..., list[str]], context: Sequence[object] = ()) -> None:
    """A warning for each of `problems(value, *context values)` as the user types into `component` (a number field;
    it has no gradio minimum or maximum, whose refusal would be an error naming no field)."""
    import gradio as gr

    def check(value: object, *given: object) -> None:  # noqa: ANN401
        for problem in problems(value, *given):
            gr.Warning(problem)

    component.input(check, [component, *context], None, api_visibility="private", show_progress="hidden",
                    trigger_mode="always_last")


def whole_number_problems(key: str, value: object, labels: Mapping[str, str], low: int = 1,
                          high: int | None = None, hint: str = "") -> list[str]:
    """The problem of a number control outside the form (the Run tab's N, the captions' batch size) that must be a
    whole number from `low` (to `high`), in page words; [] when it is one."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = None
    if number is not None and number.is_integer() and low <= number <= (high if high is not None else number):
        return []
    limits = f"from {low} to {high}" if high is not None else f"of at least {low}"
    return [field_problem(key, f"must be a whole number {limits}{hint}", labels, value)]


def flags_in_page_words(text: str) -> str:
    """A captioning message as the page shows it: the command line's options (--batch-size) named by the page's
    controls for them ('Batch size (Automatic captions, caption_batch_size)')."""
    return CAPTION_FLAG.sub(lambda found: named(CAPTION_FLAGS[found.group(1)], CAPTION_LABELS), text)
