"""Run tab: drive a session (start, train N steps, validate, save, stop, end), resume an interrupted run; live
progress, loss plot, samples and log. The view is the app's, not the browser's: every browser sees the one run,
whoever started it, and a second Start is refused while it goes on."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.folders import Folders
from ui import form, multi_gpu, previews
from ui.feedback import problems_update
from ui.gauges import gauges_html, read_gauges
from ui.jobs import Outcome
from ui.resume import InterruptedRun
from ui.run_route import PART_JS
from ui.run_state import CLIP_COLUMNS, LOSS_COLUMNS, REFUSED, RunView
from ui.sample_compare import compare_html
from ui.served import allowed_paths
from ui.studio import STEPS_LABEL, Studio, steps_problems
from ui.words import warn_as_typed

LOSS_COLOURS = {"loss": "#93c5fd", "smoothed": "#1d4ed8", "eval": "#16a34a"}  # the series of RunView.loss_rows

# Keep the log scrolled to its newest line unless the user scrolled up to read (gradio's autoscroll fires once).
FOLLOW_LOG_JS = """() => {
  const box = document.querySelector('#studio-log textarea');
  if (!box) return;
  const seen = Number(box.dataset.seenHeight || 0);
  if (box.scrollTop + box.clientHeight >= seen - 8) box.scrollTop = box.scrollHeight;
  box.dataset.seenHeight = box.scrollHeight;
}"""
BUTTONS = ("start", "train", "validate", "save", "stop", "end", "resume")  # the names of Studio.actions()
# The Run tab's outputs the browser's poll sets, in the order POLL_JS returns their values.
POLL_OUTPUTS = ("status", "progress", "memory", "plot", "clip_plot", "log", "problems", "samples_seen", "ended",
                "preview_seen")
# Every open page polls once a second, in the browser alone (no gradio request): it fetches the run's state that
# the publisher made once for every page (ui/run_route.py, 304 while unchanged), and the plots and the log only when
# their version changed. A value left undefined leaves its output as it is. A button that cannot act now is
# disabled and says why on hover (gradio buttons have no tooltip), after every poll: the Run tab's buttons exist
# only once it was opened. A start's problems stay up until the run they were about moves on (e.g. "already in
# progress"); a refusal is the problem itself.
POLL_JS = """async () => {
  const me = window.studioRun || (window.studioRun = {state: '', plot: '', clip: '', log: '', status: null,
                                                      samples: '', ended: '', preview: '', actions: {}});
  """ + PART_JS + """
  const buttons = () => { for (const [name, why] of Object.entries(me.actions || {})) {
    const button = document.getElementById('run-' + name);
    if (button) { button.title = why; button.disabled = Boolean(why); } } };
  const got = await part('state', me.state);
  if (!got) { buttons(); return []; }
  const state = got.value;
  me.state = got.etag; me.actions = state.actions; buttons();
  const out = [state.status_text, state.progress, state.memory];
  for (const [index, name] of [[3, 'plot'], [4, 'clip'], [5, 'log']]) {
    if (state[name] === me[name]) continue;
    const fetched = await part(name, '');
    if (!fetched) continue;
    me[name] = fetched.etag;
    out[index] = name === 'clip' ? {__type__: 'update', value: fetched.value, visible: fetched.value !== null}
                                 : fetched.value;
  }
  if (me.status !== null && me.status !== state.status && state.status !== '""" + REFUSED + """')
    out[6] = {__type__: 'update', visible: false, value: ''};
  me.status = state.status;
  for (const [index, name] of [[7, 'samples'], [8, 'ended'], [9, 'preview']]) {
    if (state[name] !== me[name]) { out[index] = state[name]; me[name] = state[name]; }
  }
  out.length = """ + str(len(POLL_OUTPUTS)) + """;
  return out;
}"""
# The Run tab's N is kept in the browser, so a reload shows the one the user chose.
STEPS_KEY = "flux-studio-run-steps"
DEFAULT_STEPS = 10


def progress_html(view: RunView) -> str:
    return view.progress_html()


def loss_frame(view: RunView) -> Any:  # noqa: ANN401 - a pandas DataFrame (pandas comes with gradio), or None
    """The plot's rows; None before the first step: a gradio LinePlot that once showed an empty frame with a colour
    column never draws the lines of later frames (gradio 6.31; seen in tests/test_browser.py's screenshots)."""
    import pandas as pd

    rows = view.loss_rows()
    if not rows:
        return None
    # Typed columns: the plot takes its axis types from the dtypes (object would be nominal).
    frame = pd.DataFrame(rows, columns=LOSS_COLUMNS)
    return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


def clip_frame(view: RunView) -> Any:  # noqa: ANN401 - a pandas DataFrame, or None
    """The CLIP score plot's rows; None before the first score (see loss_frame)."""
    import pandas as pd

    rows = view.clip_rows()
    if not rows:
        return None
    return pd.DataFrame(rows, columns=CLIP_COLUMNS).astype({"step": "int64", "clip_score": "float64"})


def gallery_items(view: RunView, roots: list[str], folders: Folders | None = None) -> list[tuple[Any, str]]:
    """Sample files gradio serves (`roots`) go by path; one in another folder the app may use is loaded and sent
    as an image; one anywhere else is left out (a run can only have put it there through a link)."""
    items: list[tuple[Any, str]] = []
    for path, label in view.gallery():
        resolved = Path(path).resolve()
        if any(resolved.is_relative_to(root) for root in roots):
            items.append((str(resolved), label))
        elif (folders is None or folders.allows(resolved)) and resolved.is_file():
            from PIL import Image

            with Image.open(resolved) as image:
                items.append((image.copy(), label))
    return items


def offer_updates(found: InterruptedRun | None) -> tuple[str, Any, Any]:
    """The resume offer's text (plain, for the API), its row (shown only when there is something to resume) and
    its Continue button, which names the step."""
    if found is None:
        return "", gr.update(visible=False), gr.update()
    return found.text(), gr.update(visible=True), gr.update(value=f"Continue at step {found.step}")


def refused_problems(studio: Studio, values: dict[str, Any], shown: str) -> Any:  # noqa: ANN401
    """The problems box checked again after the form changed: gone when its problems are (see Studio.recheck)."""
    if not str(shown or "").strip():
        return gr.skip()
    problems = studio.recheck(values, values.pop("base", None))
    if problems is None:
        return gr.skip()
    return gr.update(visible=bool(problems), value="\n".join(problems))


@dataclass
class _View:
    """The Run tab's components, built by `build` and wired by the `_connect_*` functions."""

    buttons: dict[str, gr.Button]
    steps: gr.Number
    offer: gr.Markdown
    offer_row: gr.Row
    status: gr.Textbox
    problems: gr.Textbox
    progress: gr.HTML
    memory: gr.HTML
    plot: gr.LinePlot
    clip_plot: gr.LinePlot
    gallery: gr.Gallery
    log: gr.Textbox
    preview_seen: gr.Textbox  # set by the poll to the live preview's key: its change sends the image
    compare: gr.HTML


def build(fields: dict[str, gr.components.Component], studio: Studio, base: gr.State,
          app: gr.Blocks | None = None) -> None:
    """The Run tab; `base` holds the fields of a loaded job that the form has no control for. With `app`, the
    resume offer is also checked, and the Run tab's N restored, when the page loads."""
    view = _build_view(fields, studio, base)
    form_kwargs = {**{form.api_name(k): fields[k] for k in form.FORM_KEYS}, "base": base}
    refresh_offer = _connect_resume_offer(view, fields, studio, form_kwargs, app)
    _connect_actions(view, studio, form_kwargs, refresh_offer)
    _connect_steps(view.steps, app)
    # A refused Start's problems go once the form no longer has them.
    gr.on([fields[key].change for key in form.FORM_KEYS],
          form.keyword_handler(lambda values: refused_problems(studio, values, values.pop("problems", "")),
                               extra=("base", "problems")),
          inputs_kwargs={**form_kwargs, "problems": view.problems}, outputs=view.problems, api_visibility="private",
          show_progress="hidden", trigger_mode="always_last")
    _connect_poll(view, studio, refresh_offer)


def _build_view(fields: dict[str, gr.components.Component], studio: Studio, base: gr.State) -> _View:
    with gr.Row():
        buttons = {"start": gr.Button("Start", variant="primary", scale=2, elem_id="run-start")}
        steps = gr.Number(DEFAULT_STEPS, label=STEPS_LABEL, precision=0, step=1, scale=1, min_width=90,
                          elem_id="run-steps")
        warn_as_typed(steps, steps_problems)
        buttons["train"] = gr.Button("Train N steps", scale=2, elem_id="run-train")
        buttons["validate"] = gr.Button("Validate now", scale=2, elem_id="run-validate")
        buttons["save"] = gr.Button("Save LoRA", scale=2, elem_id="run-save")
        buttons["stop"] = gr.Button("Stop", variant="stop", scale=2, elem_id="run-stop")
        buttons["end"] = gr.Button("End training", scale=2, elem_id="run-end")
    connect_multi_gpu = multi_gpu.build(fields, studio, base)  # the "Several GPUs" accordion
    with gr.Row(visible=False, equal_height=True, elem_id="resume-offer") as offer_row:
        offer = gr.Markdown("", label="Resume offer")
        buttons["resume"] = gr.Button("Continue", variant="primary", scale=0, min_width=160, elem_id="run-resume")
        buttons["start_new"] = gr.Button("Start a new run", scale=0, min_width=160, elem_id="run-start-new")
    reasons = studio.actions()
    for name in BUTTONS:
        buttons[name].interactive = not reasons[name]
    status = gr.Textbox(value=studio.view.status_text(), label="Status", interactive=False)
    problems = gr.Textbox(label="Problems", visible=False, interactive=False, lines=3)
    connect_multi_gpu(status, problems)
    progress = gr.HTML(progress_html(studio.view), label="Progress", elem_id="run-progress")
    memory = gr.HTML(gauges_html(read_gauges()), label="Memory", elem_id="run-memory")
    compare = gr.HTML(compare_html(studio.view, allowed_paths(studio.workdir), studio.folders),
                      label="Step 0 beside the latest", elem_id="run-compare")
    with gr.Row():
        # No fixed height: at 300 px the legend under the plot was cut off. Raw loss pale, its average strong.
        plot = gr.LinePlot(loss_frame(studio.view), x="step", y="loss", color="series", title="Loss", label="Loss",
                           color_title="", color_map=LOSS_COLOURS, scale=1, elem_id="run-loss")
        # Grows with its samples (at a fixed 300 px it scrolled after six); each label whole, under its picture.
        gallery = gr.Gallery(label="Samples", columns=3, height="fit-content", scale=1, object_fit="contain",
                             elem_id="run-samples")
    preview_seen = previews.build(studio)  # the sample rendering now, as far as it got (sample.preview_every)
    # sample.clip_score_model: how well the samples match their prompts, per validation (hidden until scored)
    clip_plot = gr.LinePlot(clip_frame(studio.view), x="step", y="clip_score", title="CLIP score of the samples",
                            label="CLIP score", visible=bool(studio.view.clip_scores), elem_id="run-clip-score")
    log = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, elem_id="studio-log")
    log.change(None, js=FOLLOW_LOG_JS, api_visibility="private", show_progress="hidden")
    return _View(buttons, steps, offer, offer_row, status, problems, progress, memory, plot, clip_plot, gallery, log,
                 preview_seen, compare)


def _connect_resume_offer(view: _View, fields: dict[str, gr.components.Component], studio: Studio,
                          form_kwargs: dict[str, Any], app: gr.Blocks | None) -> Callable[[Any], None]:
    """The resume offer and its Resume button; returns `refresh_offer(event)`, which checks the offer again after
    an action that starts or ends a session."""
    offer_inputs = {"output_dir": fields["output.dir"], "train_max_steps": fields["train.max_steps"]}
    outputs = [view.offer, view.offer_row, view.buttons["resume"]]

    def resume_offer(output_dir: str, train_max_steps: Any) -> tuple[Any, ...]:  # noqa: ANN401
        """'An interrupted run was found at step N in DIR …' when output_dir holds an unfinished run, else ''."""
        return offer_updates(studio.offered_run(output_dir, train_max_steps))

    gr.on([fields["output.dir"].change, fields["train.max_steps"].change], resume_offer, inputs_kwargs=offer_inputs,
          outputs=outputs, api_name="resume_offer", show_progress="hidden")
    if app is not None:
        def offer_on_load() -> tuple[Any, ...]:
            # The page's own values are the defaults until the remembered form fills it (a second handler of the
            # load, which raced this one): ask about that form's folder.
            return offer_updates(studio.offered_run(*studio.remembered_output()))

        app.load(offer_on_load, None, outputs, api_visibility="private", show_progress="hidden")

    def refresh_offer(event: Any) -> None:  # noqa: ANN401 - a gradio Dependency, or an event listener
        listen = event.then if hasattr(event, "then") else event
        listen(resume_offer, inputs_kwargs=offer_inputs, outputs=outputs, api_visibility="private",
               show_progress="hidden")

    def answer(outcome: Outcome) -> tuple[str, Any]:
        studio.publisher.publish()  # the next poll shows the new run
        return outcome.message, problems_update(outcome)

    def resume_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Continue the form's job from the latest training state in its output.dir (exact resume)."""
        return answer(studio.start(values, values.pop("base", None), resume=True))

    def start_new_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Start the form's job as a new run; the earlier run in its output.dir is moved to earlier_runs/<stamp>
        once the new run's first step is about to train."""
        return answer(studio.start(values, values.pop("base", None), new_run=True))

    for name, handler in (("resume", resume_run), ("start_new", start_new_run)):
        refresh_offer(view.buttons[name].click(
            form.keyword_handler(handler, extra=("base",)), inputs_kwargs=form_kwargs,
            outputs=[view.status, view.problems], api_name=name, concurrency_limit=1))
    return refresh_offer


def _connect_actions(view: _View, studio: Studio, form_kwargs: dict[str, Any],
                     refresh_offer: Callable[[Any], None]) -> None:
    """Start, Train N steps, Validate now, Save LoRA, Stop, End training."""
    buttons, answer = view.buttons, [view.status, view.problems]

    def shown(outcome: Outcome) -> tuple[str, Any]:
        # Published at once: the page's (and the API's) next poll shows what the button changed.
        studio.publisher.publish()
        return outcome.message, problems_update(outcome)

    def start_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Validate the form and start training it; with every value left at its default this trains the demo.
        Over a run that can be resumed it asks first: Resume continues it, start_new starts a new one."""
        outcome = studio.start(values, values.pop("base", None))
        return shown(outcome)

    refresh_offer(buttons["start"].click(form.keyword_handler(start_run, extra=("base",)), inputs_kwargs=form_kwargs,
                                         outputs=answer, api_name="start", concurrency_limit=1))

    def train_run(values: dict[str, Any]) -> tuple[str, Any]:
        """Train `steps` more steps, then pause: on the live session, on a stopped run in output.dir (continued
        from its state), or on one set up from the form first (the form is ignored while a session is live)."""
        outcome = studio.train_steps(values, values.pop("steps", None), values.pop("base", None))
        for note in outcome.notes:
            gr.Warning(note)
        return shown(outcome)

    refresh_offer(buttons["train"].click(form.keyword_handler(train_run, extra=("base", "steps")),
                                         inputs_kwargs={"steps": view.steps, **form_kwargs}, outputs=answer,
                                         api_name="train_steps", concurrency_limit=1))

    def validate_now() -> tuple[str, Any]:
        """Render the sample prompts with the current LoRA: now while paused, after the current step while
        training."""
        outcome = studio.validate_now()
        return shown(outcome)

    buttons["validate"].click(validate_now, None, answer, api_name="validate_now", concurrency_limit=1)

    def save_now() -> tuple[str, Any]:
        """Save an intermediate LoRA (name-stepNNNNNN) now while paused, after the current step while training."""
        outcome = studio.save_now()
        return shown(outcome)

    buttons["save"].click(save_now, None, answer, api_name="save_now", concurrency_limit=1)

    def stop_run() -> str:
        """Stop training after the current step; the LoRA is saved. Train N steps continues a paused session."""
        text = studio.stop()
        studio.publisher.publish()
        if not text.startswith("stopping"):
            gr.Warning(text)  # the next poll rewrites the status line within a second; the toast stays to be read
        return text

    buttons["stop"].click(stop_run, None, view.status, api_name="stop")

    def end_training() -> tuple[str, Any]:
        """Save the final LoRA (if anything is unsaved), render the final samples and free the session."""
        outcome = studio.end_training()
        return shown(outcome)

    buttons["end"].click(end_training, None, answer, api_name="end_training", concurrency_limit=1)


def _connect_steps(steps: gr.Number, app: gr.Blocks | None) -> None:
    """The Run tab's N, kept in the browser's localStorage across reloads (in the browser alone: no request)."""
    if app is None:
        return
    steps.change(None, steps, None, js=f"(n) => {{ if (n >= 1) localStorage.setItem('{STEPS_KEY}', n); }}",
                 api_visibility="private", show_progress="hidden")
    app.load(None, None, steps, js=f"() => Number(localStorage.getItem('{STEPS_KEY}')) || {DEFAULT_STEPS}",
             api_visibility="private", show_progress="hidden")


def _connect_poll(view: _View, studio: Studio, refresh_offer: Callable[[Any], None]) -> None:
    """The browser's poll every second (POLL_JS): the run's status, progress, memory gauges, loss and CLIP plots,
    log, and the buttons' states, from the published state; the samples when new ones arrive. A run that ends
    checks the resume offer again. The same state answers the API's /poll."""
    roots = allowed_paths(studio.workdir)
    # Set by the poll when a sample arrives or the run's status changes: their change events ask the server.
    samples_seen = gr.Textbox("", visible="hidden", elem_id="run-samples-seen")
    ended = gr.Textbox("", visible="hidden", elem_id="run-ended")

    def samples() -> list[tuple[Any, str]]:
        """The sample images so far, each labelled with its step and prompt."""
        with studio.view.lock:
            return gallery_items(studio.view, roots, studio.folders)

    samples_seen.change(samples, None, view.gallery, api_name="samples", show_progress="hidden",
                        concurrency_limit=None)
    refresh_offer(ended.change)

    def comparison() -> str:
        """Each sample prompt's step-0 image beside its latest, labelled with their steps."""
        with studio.view.lock:
            return compare_html(studio.view, roots, studio.folders)

    samples_seen.change(comparison, None, view.compare, api_name="compare", show_progress="hidden",
                        concurrency_limit=None)
    def poll() -> tuple[str, str, dict | None, str, dict]:
        """(status line, progress, loss plot, log, why each Run tab button cannot act now) of the published state:
        'idle', 'running: step 12/40', 'paused at step 12 — …', 'completed: LoRA saved to …', 'failed: …'. The
        samples: /samples."""
        published = studio.publisher.latest()
        snap = published.snapshot
        return snap.status_text, snap.progress_html, snap.plot, snap.log_text, published.actions

    # gradio reads the API's outputs from the return annotation, which `from __future__ import annotations` makes a
    # string: one output per value, as the page's poll had.
    poll.__signature__ = inspect.Signature(return_annotation=tuple[str, str, dict | None, str, dict])
    gr.api(poll, api_name="poll", concurrency_limit=None)
    outputs = {"status": view.status, "progress": view.progress, "memory": view.memory, "plot": view.plot,
               "clip_plot": view.clip_plot, "log": view.log, "problems": view.problems,
               "samples_seen": samples_seen, "ended": ended, "preview_seen": view.preview_seen}
    gr.Timer(1.0).tick(None, None, [outputs[name] for name in POLL_OUTPUTS], js=POLL_JS, api_visibility="private",
                       show_progress="hidden")
    studio.publisher.start()
