"""Dataset & Captioning tab: one image folder, how its captions are made, its masks, its edit pairs' reference
folder (Kontext, FLUX.2), the images held out for the evaluation loss; resolutions, buckets and caches; a check
that runs the health check and the bucket plan; automatic captioning in a background thread; a caption editor a
page of images at a time."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import gradio as gr

from trainer.data.captioners import CAPTIONERS
from ui import caption_editor, upload_area
from ui.captioning import MAX_LENGTH_RANGE, batch_size_problems
from ui.dataset_check import CHECKING
from ui.edit_pairs import edit_controls
from ui.feedback import problems_update
from ui.form import FORM_KEYS, api_name, field_choices, keyword_handler
from ui.run_route import PART_JS
from ui.sliders import BoundSlider
from ui.studio import Studio
from ui.words import CAPTION_LABELS, warn_as_typed

# The captioning line and log, polled in the browser each second from the published state (ui/run_publisher.py): no
# gradio request per page; the log is fetched only when it changed. Undefined leaves an output as it is.
CAPTION_POLL_JS = """async () => {
  const me = window.studioCaption || (window.studioCaption = {state: '', log: ''});
  """ + PART_JS + """
  const got = await part('state', me.state);
  if (!got) return [];
  me.state = got.etag;
  const out = [got.value.caption, undefined];
  if (got.value.caption_log !== me.log) {
    const log = await part('caption_log', '');
    if (log) { out[1] = log.value; me.log = log.etag; }
  }
  return out;
}"""

# What the check reads: the dataset fields, the data section, the batch settings the health check counts, and the
# model (whether it takes the edit pairs' references).
CHECK_KEYS = tuple(key for key in FORM_KEYS if key.startswith(("dataset.", "data."))) + (
    "train.batch_size", "train.gradient_accumulation", "model.family", "model.flavour")
EDITOR_COLUMNS = 4

# The verdict line, coloured by its first word; the text stays plain for the API.
VERDICT_HTML = """<div class="verdict ${(value || '').startsWith('ok') ? 'ok' : (value || '').startsWith('warnings') ?
'warn' : (value || '').startsWith('will not') ? 'bad' : 'info'}">${value || ''}</div>"""
VERDICT_CSS = """
.verdict { font-size: 1.1rem; font-weight: 600; padding: 8px 12px; border-radius: 6px; border-left: 6px solid; }
.verdict:empty { display: none; }
.ok { border-color: #16a34a; background: rgba(22, 163, 74, 0.12); }
.warn { border-color: #d97706; background: rgba(217, 119, 6, 0.12); }
.bad { border-color: #dc2626; background: rgba(220, 38, 38, 0.12); }
.info { border-color: #6b7280; background: rgba(107, 114, 128, 0.12); }
"""


def buckets_markdown(report: str) -> str:
    return f"**Bucket plan**\n\n```text\n{report}\n```" if report else ""


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any], studio: Studio,
          base: gr.State | None = None) -> Callable[[], None]:
    """The tab's controls; returns `connect`, to call once every tab's fields exist (the check reads the batch
    size from the Training tab)."""
    fields["dataset.path"] = gr.Textbox(
        value=defaults["dataset.path"], label="Image folder",
        info="a folder of images; captions in .txt files beside them (same name)")
    with gr.Accordion("Upload images", open=False):
        upload_area.connect(upload_area.build(studio, "dataset-upload"), studio, [fields["dataset.path"]])
    with gr.Row():
        fields["dataset.trigger"] = gr.Textbox(
            value=defaults["dataset.trigger"], label="Trigger word",
            info="put in front of every caption that lacks it")
        fields["dataset.caption_strategy"] = gr.Dropdown(
            choices=field_choices("dataset.caption_strategy"), value=defaults["dataset.caption_strategy"],
            label="Caption strategy", info="textfile: the .txt beside each image; filename: the file name; "
                                           "instance_prompt: the same caption for every image")
    fields["dataset.instance_prompt"] = gr.Textbox(
        value=defaults["dataset.instance_prompt"], label="Instance prompt",
        info="the caption of every image when the strategy is instance_prompt")
    with gr.Row():
        fields["dataset.repeats"] = gr.Number(
            value=defaults["dataset.repeats"], precision=0, label="Repeats",
            info="times each image is seen per epoch")
        fields["data.caption_dropout"] = BoundSlider(
            0.0, 1.0, value=defaults["data.caption_dropout"], step=0.01, label="Caption dropout",
            info="share of steps trained with an empty caption")
    fields["dataset.masks"] = gr.Textbox(
        value=defaults["dataset.masks"], label="Mask folder",
        info="optional: mask images with the same names as the training images; white is trained, black is "
             "ignored by the loss")
    pairs = _edit_pairs(fields, defaults)
    with gr.Row():
        fields["data.eval_holdout"] = gr.Number(
            value=defaults["data.eval_holdout"], precision=0, label="Evaluation hold-out",
            info="images held out of the first dataset (from its end) for the evaluation loss; 0: none")
        fields["data.prior_loss_weight"] = gr.Number(
            value=defaults["data.prior_loss_weight"], label="Prior loss weight", step=0.1,
            info="loss weight of regularisation (prior-preservation) datasets, those marked is_regularisation "
                 "in a loaded job")
    _buckets_and_caches(fields, defaults)
    check = gr.Button("Check dataset")
    verdict = gr.HTML("", html_template=VERDICT_HTML, css_template=VERDICT_CSS, js_on_load=None,
                      label="Verdict")
    health = gr.Markdown()
    buckets = gr.Markdown()
    _captioning(fields, studio)
    _caption_editor(fields, studio)

    def check_dataset(values: dict[str, Any]) -> Any:  # noqa: ANN401 - a generator of updates
        """Health check and bucket plan of the dataset, as a run would make them: first the verdict line ('ok — …',
        'warnings — …', 'will not train — …'), then the health report (markdown), then the bucket plan."""
        yield CHECKING, "", ""
        result = studio.check_dataset(values, values.pop("base", None))
        yield result.line, result.details, buckets_markdown(result.buckets)

    def connect() -> None:
        inputs = {api_name(key): fields[key] for key in CHECK_KEYS}
        if base is not None:
            inputs["base"] = base
        check.click(keyword_handler(check_dataset, extra=("base",)), inputs_kwargs=inputs,
                    outputs=[verdict, health, buckets], api_name="check_dataset", show_progress="minimal")
        pairs()

    return connect


def _edit_pairs(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> Callable[[], None]:
    """The reference folder of edit pairs and how references are cut, with a note on the flavour; returns the
    wiring to call once the Model and Training tabs exist (the flavour decides what shows, on both tabs)."""
    shown = edit_controls(defaults["model.family"], defaults["model.flavour"], defaults["dataset.conditioning"],
                          defaults["sample.reference_images"])
    with gr.Accordion("Edit pairs (FLUX.1 Kontext, FLUX.2)", open=bool(defaults["dataset.conditioning"])):
        note = gr.Markdown(shown.note)
        with gr.Row(visible=shown.show_pairs) as row:
            fields["dataset.conditioning"] = gr.Textbox(
                value=defaults["dataset.conditioning"], label="Reference folder", scale=3,
                info="optional: the reference (before) images, each named like its target in the image folder; "
                     "empty: no edit pairs")
            fields["dataset.conditioning_match"] = gr.Radio(
                choices=field_choices("dataset.conditioning_match"), value=defaults["dataset.conditioning_match"],
                label="Reference crop", info="strict: cut like its target; loose: its own aspect ratio")

    def connect() -> None:
        controls = [fields[key] for key in ("model.family", "model.flavour", "dataset.conditioning",
                                            "sample.reference_images")]

        def show(family: str, flavour: str, conditioning: str, reference_images: str) -> tuple[Any, Any, Any]:
            state = edit_controls(family, flavour, conditioning, reference_images)
            return state.note, gr.update(visible=state.show_pairs), gr.update(visible=state.show_sample_references)

        # .change, so a loaded job's or a preset's flavour shows or hides them too
        gr.on([fields["model.family"].change, fields["model.flavour"].change], show, controls,
              [note, row, fields["sample.reference_images"]], api_visibility="private", show_progress="hidden")

    return connect


def _buckets_and_caches(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    gr.Markdown("#### Resolution, buckets and caches")
    with gr.Row():
        fields["data.resolution"] = gr.Textbox(
            value=defaults["data.resolution"], label="Resolution (px)",
            info="pixel area of the buckets: 1024, or several to train each image at each: 512, 768, 1024")
        fields["data.bucket_step"] = gr.Number(
            value=defaults["data.bucket_step"], precision=0, step=16, label="Bucket step",
            info="bucket sides are multiples of this (a multiple of 16)")
        fields["data.max_upscale"] = gr.Number(
            value=defaults["data.max_upscale"], step=0.25, label="Max upscale",
            info="1: never enlarge (a small image trains in a smaller bucket)")
        fields["data.min_size"] = gr.Number(
            value=defaults["data.min_size"], precision=0, label="Min size (px)",
            info="images with a shorter side below this are skipped; 0: the buckets decide")
        fields["dataset.crop"] = gr.Radio(
            choices=field_choices("dataset.crop"), value=defaults["dataset.crop"], label="Crop",
            info="how an image is cut to its bucket's aspect ratio")
    with gr.Row():
        fields["data.cache_latents"] = gr.Radio(
            choices=field_choices("data.cache_latents"), value=defaults["data.cache_latents"],
            label="Cache latents", info="disk: kept in the cache folder and reused by later runs")
        fields["data.cache_text_embeddings"] = gr.Radio(
            choices=field_choices("data.cache_text_embeddings"), value=defaults["data.cache_text_embeddings"],
            label="Cache text embeddings", info="disk: a later run with the same captions loads no text encoder")
        fields["data.cache_dir"] = gr.Textbox(
            value=defaults["data.cache_dir"], label="Cache folder", placeholder="output folder/cache",
            info="for the disk caches; empty: the cache folder inside the output folder")


# ---------------------------------------------------------------------- automatic captions


def _captioning(fields: dict[str, gr.components.Component], studio: Studio) -> None:
    kinds = list(CAPTIONERS)
    with gr.Accordion("Automatic captions", open=False):
        gr.Markdown("Writes a caption .txt beside every image of the image folder above that has none (or every "
                    "image, with Overwrite). The model is downloaded on first use unless the source is a local "
                    "folder.")
        with gr.Row():
            model = gr.Dropdown(choices=kinds, value=kinds[0], label=CAPTION_LABELS["caption_model"])
            source = gr.Textbox("", label=CAPTION_LABELS["caption_source"], placeholder=CAPTIONERS[kinds[0]],
                                info="hub id or local model folder; empty: the placeholder's hub id")
        with gr.Row():
            trigger = gr.Textbox("", label=CAPTION_LABELS["caption_trigger"],
                                 info="written after the prefix in every caption")
            prefix = gr.Textbox("", label=CAPTION_LABELS["caption_prefix"],
                                info="text before the caption, e.g. a style")
            suffix = gr.Textbox("", label=CAPTION_LABELS["caption_suffix"], info="text after the caption")
        with gr.Row():
            low, high = MAX_LENGTH_RANGE
            max_length = BoundSlider(low, high, value=200, step=1, label=CAPTION_LABELS["caption_max_length"])
            batch_size = gr.Number(value=4, precision=0, label=CAPTION_LABELS["caption_batch_size"],
                                   info="images per model call; lower it if memory runs out")
            warn_as_typed(batch_size, batch_size_problems)
            overwrite = gr.Checkbox(value=False, label=CAPTION_LABELS["caption_overwrite"])
        with gr.Row():
            start = gr.Button("Caption", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        status = gr.Textbox(value=studio.captioning.snapshot().line, label="Captioning", interactive=False)
        problems = gr.Textbox(label="Problems", visible=False, interactive=False, lines=2)
        log = gr.Textbox(label="Captioning log", lines=8, max_lines=8, interactive=False, autoscroll=True)

    def placeholder(kind: str) -> Any:  # noqa: ANN401
        return gr.update(placeholder=CAPTIONERS.get(kind, ""))

    model.change(placeholder, model, source, api_visibility="private", show_progress="hidden")

    def caption_start(dataset_path: str, caption_model: str, caption_source: str, caption_trigger: str,
                      caption_prefix: str, caption_suffix: str, caption_max_length: float,
                      caption_overwrite: bool, caption_batch_size: float) -> tuple[str, Any]:
        """Caption the images of dataset_path in the background (one job at a time; not while training runs).
        Returns the status line and the problems."""
        outcome = studio.caption_start(dataset_path, caption_model, caption_source, trigger=caption_trigger,
                                       prefix=caption_prefix, suffix=caption_suffix, max_length=caption_max_length,
                                       overwrite=caption_overwrite, batch_size=caption_batch_size)
        studio.publisher.publish()  # the next poll shows it started
        return outcome.message, problems_update(outcome)

    start.click(caption_start, [fields["dataset.path"], model, source, trigger, prefix, suffix, max_length,
                                overwrite, batch_size], [status, problems], api_name="caption_start",
                concurrency_limit=1)

    def caption_stop() -> str:
        """Stop captioning before its next batch; captions written so far stay."""
        text = studio.caption_stop()
        studio.publisher.publish()
        return text

    stop.click(caption_stop, None, status, api_name="caption_stop")

    def caption_poll() -> tuple[str, str]:
        """The captioning line first ('idle', 'loading: …', 'captioning 3/10: name.png', 'finished: …',
        'stopped: …', 'failed: …'), then the log; from the published state."""
        caption = studio.publisher.latest().caption
        return caption.line, caption.log

    # gradio reads the API's outputs from the return annotation (a string under `from __future__ import
    # annotations`): one output per value.
    caption_poll.__signature__ = inspect.Signature(return_annotation=tuple[str, str])
    gr.api(caption_poll, api_name="caption_poll", concurrency_limit=None)
    # The page polls in the browser alone, from the state the Run tab's pages poll too (ui/run_route.py)
    gr.Timer(1.0).tick(None, None, [status, log], js=CAPTION_POLL_JS, api_visibility="private",
                       show_progress="hidden")


# ---------------------------------------------------------------------- the caption editor


def _render_page(current: caption_editor.EditorState, thumbnails: bool = True) -> list[Any]:
    """The page line, then per slot: thumbnail, caption box (labelled with the file name), visibility.
    `thumbnails=False` leaves the pictures as they are (same page)."""
    indices = list(caption_editor.page_indices(current))
    count = len(current["names"])
    line = ""
    if current["folder"]:
        unsaved = caption_editor.changed_count(current)
        line = (f"page {min(current['page'], caption_editor.page_count(current) - 1) + 1} of "
                f"{caption_editor.page_count(current)} · {count} images"
                + (f" · {unsaved} unsaved changes" if unsaved else ""))
    pictures, boxes, shown = [], [], []
    for slot in range(caption_editor.PAGE_SIZE):
        if slot < len(indices):
            index = indices[slot]
            pictures.append(caption_editor.thumbnail(current, index) if thumbnails else gr.skip())
            boxes.append(gr.update(value=current["captions"][index], label=current["names"][index]))
            shown.append(gr.update(visible=True))
        else:
            pictures.append(None)
            boxes.append(gr.update(value="", label=f"caption {slot + 1}"))
            shown.append(gr.update(visible=False))
    return [line, *pictures, *boxes, *shown]


def _caption_editor(fields: dict[str, gr.components.Component], studio: Studio) -> None:
    size = caption_editor.PAGE_SIZE
    with gr.Accordion("Caption editor", open=False):
        with gr.Row():
            load = gr.Button("Load captions")
            save = gr.Button("Save captions", variant="primary")
            previous = gr.Button("◀ Previous")
            following = gr.Button("Next ▶")
        status = gr.Textbox(label="Editor", interactive=False)
        page_line = gr.Markdown()
        images: list[gr.Image] = []
        texts: list[gr.Textbox] = []
        slots: list[gr.Column] = []
        for row_start in range(0, size, EDITOR_COLUMNS):
            with gr.Row(equal_height=False):
                for index in range(row_start, min(row_start + EDITOR_COLUMNS, size)):
                    with gr.Column(visible=False, min_width=180) as slot:
                        images.append(gr.Image(type="pil", interactive=False, height=180, show_label=False,
                                               buttons=["fullscreen"], container=False))
                        texts.append(gr.Textbox(label=f"caption {index + 1}", lines=3, max_lines=8))
                    slots.append(slot)
    state = gr.State(caption_editor.empty_state())
    page_outputs = [page_line, *images, *texts, *slots]

    def captions_load(dataset_path: str) -> list[Any]:
        """Show the images of dataset_path with their captions, a page at a time: the editor's status line first."""
        current, outcome = studio.load_captions(dataset_path)
        for note in outcome.notes:
            gr.Warning(note)
        return [outcome.message if outcome.ok else f"not loaded: {outcome.message}", current, *_render_page(current)]

    load.click(captions_load, fields["dataset.path"], [status, state, *page_outputs], api_name="captions_load")

    # The caption boxes by keyword (caption_1 … caption_12), so the API names them.
    edit_inputs = {"editor": state, **{f"caption_{slot + 1}": box for slot, box in enumerate(texts)}}

    def edits(kwargs: dict[str, Any]) -> caption_editor.EditorState:
        boxes = [kwargs.get(f"caption_{slot + 1}") for slot in range(size)]
        return caption_editor.keep_edits(kwargs["editor"], boxes)

    def turn(step: int) -> Callable[..., list[Any]]:
        def captions_page(**kwargs: Any) -> list[Any]:
            current = edits(kwargs)
            current = caption_editor.go_to_page(current, current["page"] + step)
            return [current, *_render_page(current)]

        return captions_page

    previous.click(turn(-1), inputs_kwargs=edit_inputs, outputs=[state, *page_outputs], api_visibility="private")
    following.click(turn(1), inputs_kwargs=edit_inputs, outputs=[state, *page_outputs], api_visibility="private")

    def captions_save(**kwargs: Any) -> list[Any]:
        """Write the edited captions (.txt beside each image, atomically): the status line first ('saved 2
        changed captions', with anything not saved and why)."""
        current, outcome = studio.save_captions(edits(kwargs))
        for problem in outcome.problems[:3]:
            gr.Warning(problem)
        return [outcome.message, current, *_render_page(current, thumbnails=False)]

    save.click(captions_save, inputs_kwargs=edit_inputs, outputs=[status, state, *page_outputs],
               api_name="captions_save")
