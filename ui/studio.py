"""What the buttons do, in plain python: validate the form, start and stop runs, save and load jobs.

The gradio handlers in the tab modules call these and only turn the results into component updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.demo import is_built
from trainer.errors import UserError
from trainer.folders import Folders, PathRefused, spec_paths, written_folders
from trainer.preflight import check_files
from trainer.runners.app import AppRunner
from trainer.runners.base import (
    AlreadyRunning,
    EndTraining,
    NothingToDo,
    RunRequest,
    SaveNow,
    TrainSteps,
    ValidateNow,
)
from trainer.runners.caption import CaptionRunner, CaptionSnapshot
from trainer.spec import JobSpec, SpecError, is_local_path, parse_spec, resolve_paths
from ui import caption_editor, form
from ui.captioning import make_request
from ui.dataset_check import DatasetCheck, check_form
from ui.gauges import gauges_html, read_gauges
from ui.jobs import LAST_FORM, LastForm, Outcome, default_job_path, read_job, relative_paths, write_job
from ui.model_info import flavour_summary, target_counts  # noqa: F401 - the tabs' and tests' old import path
from ui.resume import InterruptedRun, find_interrupted_run, latest_state_step, read_history
from ui.run_history import RESOLVED_JOB, History
from ui.run_publisher import RunPublisher
from ui.run_state import REFUSED, RunView, Snapshot
from ui.upload_limits import UploadLimits
from ui.uploads import KEEP, UploadResult, dataset_folder, save_upload
from ui.words import (
    CAPTION_LABELS,
    IMAGE_FOLDER,
    all_in_page_words,
    field_problem,
    flags_in_page_words,
    named,
    whole_number_problems,
)

ALREADY_RUNNING = "a run is already in progress; stop it or wait for it to finish"
SESSION_PAUSED = ("a session is paused at step {step}; End training before starting a new run (or Train N steps "
                  "to continue it)")
CAPTIONING_IN_PROGRESS = "captioning is in progress; stop it or wait for it to finish (both need the GPU)"
TRAINING_IN_PROGRESS = "a training run is in progress; caption when it has finished (both need the GPU)"
STEPS_LABEL = "Steps to train now"  # the Run tab's N (the Training tab's run length is "Run length (steps)")


def steps_problems(steps: Any) -> list[str]:  # noqa: ANN401
    """The Run tab's N (Steps to train now), in page words (also checked as it is typed)."""
    return whole_number_problems("steps", steps, {"steps": STEPS_LABEL})


class Studio:
    """The app's server-side state: one runner and one RunView shared by every browser session.

    Every path a user types is used only inside `folders`: the workdir and the `allowed` folders (see
    trainer/folders.py).
    """

    def __init__(self, runner: AppRunner, workdir: Path, allowed: Iterable[str | Path] = (),
                 upload_limits: UploadLimits | None = None) -> None:
        self.runner = runner
        self.workdir = Path(workdir).resolve()
        self.folders = Folders.of(self.workdir, allowed)
        self.demo_dir = form.demo_dir(self.workdir).resolve()
        self.output_root = form.output_root(self.workdir).resolve()
        self.jobs_dir = self.workdir / ".studio" / "jobs"
        self.last_form = LastForm(self.workdir / ".studio" / LAST_FORM)
        self.view = RunView()
        self.captioning = CaptionRunner()
        # The Run tab's (and captioning's) state for every page, published by one thread (started by the Run tab)
        self.publisher = RunPublisher(self.view, self.refresh, lambda: gauges_html(read_gauges()),
                                      self.captioning_shown)
        self._caption_shown: CaptionSnapshot | None = None
        self.upload_limits = upload_limits or UploadLimits()
        self.history = History(self.folders, self.output_root)
        self.labels: dict[str, str] = {}  # key → the label the page shows (ui.page.build_app fills it)

    # ------------------------------------------------------------------ form → spec

    def default_values(self) -> dict[str, Any]:
        return form.spec_to_values(parse_spec(form.default_job(self.workdir)))

    def resolve(self, values: dict[str, Any], base: dict[str, Any] | None = None) -> JobSpec:
        """The form's spec with relative paths taken from the workdir; raises SpecError."""
        return resolve_paths(form.form_to_spec(values, base), self.workdir)

    def uses_demo(self, spec: JobSpec) -> bool:
        paths = [spec.model.source, *(entry.path for entry in spec.data.datasets)]
        return any(path and Path(path).is_relative_to(self.demo_dir) for path in paths)

    def demo_built(self) -> bool:
        """This code's demo is built (an older build is rebuilt by the runner, as a missing one is)."""
        return is_built(self.demo_dir)

    def preflight(self, spec: JobSpec) -> list[str]:
        """File problems, leaving out the demo folder's while the runner is still to build it."""
        problems = check_files(spec)
        if self.uses_demo(spec) and not self.demo_built():
            problems = [p for p in problems if str(self.demo_dir) not in p]
            if spec.data.datasets and Path(spec.data.datasets[0].path).is_relative_to(self.demo_dir):
                # The hold-out is counted against images not built yet; the session checks it again once they are.
                problems = [p for p in problems if not p.startswith("data.eval_holdout:")]
        return problems

    # ------------------------------------------------------------------ run control

    def _prepare(self, values: dict[str, Any], base: dict[str, Any] | None,
                 refused: str) -> tuple[JobSpec | None, Path | None, Outcome | None]:
        """(spec, demo folder to build or None, None) for a form that can run, else (None, None, why not)."""
        try:
            spec = self.resolve(values, base)
        except SpecError as exc:
            return None, None, Outcome(f"{refused}: the job has problems", all_in_page_words(exc.errors, self.labels),
                                       about_form=True)
        self.last_form.save(spec)  # what the user tried to run is what the next page load shows
        problems = list(dict.fromkeys(self.folders.problems(self.named_paths(spec_paths(spec)))
                                      + self.folders.problems(self.named_paths(written_folders(spec)), writing=True)))
        if problems:
            return None, None, Outcome(f"{refused}: a path is outside the folders this app may use", problems,
                                       about_form=True)
        problems = self.preflight(spec)
        if problems:
            return None, None, Outcome(f"{refused}: the files and folders the job names have problems", problems,
                                       about_form=True)
        demo = self.demo_dir if self.uses_demo(spec) and not self.demo_built() else None
        return spec, demo, None

    def _refusal(self) -> Outcome | None:
        """Why no new session can start now (an action in progress, a paused session), or None."""
        if self.runner.running:
            return Outcome(ALREADY_RUNNING, [ALREADY_RUNNING])
        if self.captioning.running:
            return Outcome(CAPTIONING_IN_PROGRESS, [CAPTIONING_IN_PROGRESS])
        if self.runner.live:
            message = SESSION_PAUSED.format(step=self.runner.step)
            return Outcome(message, [message])
        return None

    def start(self, values: dict[str, Any], base: dict[str, Any] | None = None, resume: bool = False,
              new_run: bool = False) -> Outcome:
        """The whole run of the form's job; `resume` continues from the latest training state in output.dir.
        Over a run that can be resumed, a Start asks first (refused with the choice) unless `new_run` says the user
        chose a new run: the session then sets the earlier one aside once its first step is about to train."""
        return self.shown(self._start(values, base, resume, new_run))

    def _start(self, values: dict[str, Any], base: dict[str, Any] | None, resume: bool,
               new_run: bool) -> Outcome:
        verb = "not resumed" if resume else "not started"
        spec, demo, refused = self._prepare(values, base, verb)
        if refused:
            return refused
        building = f"; building the demo in {demo} first" if demo else ""
        what = "resuming" if resume else "starting"

        def start_in_process() -> None:
            self.runner.start(RunRequest(spec, demo, resume))

        refused = self.launch(spec, resume, verb, start_in_process,
                              f"{what} {spec.output.name}: {spec.train.max_steps} steps, output {spec.output.dir}"
                              f"{building}", new_run)
        return refused or Outcome(f"{'resumed' if resume else 'started'}: {spec.train.max_steps} steps{building}")

    def launch(self, spec: JobSpec, resume: bool, verb: str, start: Callable[[], Outcome | None],
               description: str, new_run: bool = False) -> Outcome | None:
        """What both Start buttons (in process, several processes) share once the form's job is prepared: the state
        to resume exists; over a run that can be resumed, a start that is neither a resume nor a chosen `new_run`
        asks first (refused with the choice; nothing moves); nothing else runs; then `start()` (a refusal of its
        own, or None) and the Run view reset. Returns the refusal, or None when the run started."""
        if resume and latest_state_step(spec.output.dir) is None:
            message = f"{verb}: no saved training state in {Path(spec.output.dir) / 'state'}"
            return Outcome(message, [message])
        found = None if resume or new_run else self.resumable(spec.output.dir, spec.train.max_steps)
        if found is not None:
            message = f"{verb}: {found.choice()}"
            return Outcome(message, [message])
        with self.view.lock:  # no poll may drain the new run's first events before the view is reset
            refusal = self._refusal()
            if refusal:
                return refusal
            try:
                refused = start()
            except (AlreadyRunning, NothingToDo) as exc:  # NothingToDo: also a trainer process that cannot start
                return Outcome(str(exc), [str(exc)])
            if refused:
                return refused
            self.view.begin(spec.train.max_steps, description)
            if resume:
                self.view.restore_history(read_history(spec.output.dir))
        return None

    def shown(self, outcome: Outcome) -> Outcome:
        """A refused start with nothing else going on is what the Run tab's status line shows (not the last run's
        end); with a run going on, that run stays shown and the refusal goes to the problems box only."""
        if not outcome.ok and not (self.runner.running or self.runner.live):
            self.view.refuse(outcome.message, outcome.about_form)
        return outcome

    def resumable(self, output_dir: str | Path, max_steps: int | None = None) -> InterruptedRun | None:
        """The run in output_dir that a Resume (or Train N steps) would continue; None when there is none or this
        app's own session is working there."""
        folder = Path(output_dir)
        if (self.runner.running or self.runner.live) and self.runner.output_dir() == folder:
            return None
        return find_interrupted_run(folder, max_steps)

    def train_steps(self, values: dict[str, Any], steps: Any, base: dict[str, Any] | None = None) -> Outcome:  # noqa: ANN401
        """Train `steps` more steps: on the live session, or on a new one set up from the form first."""
        problems = steps_problems(steps)
        if problems:
            return self.shown(Outcome(f"not trained: {problems[0]}", problems))
        steps = int(float(steps))
        if self.runner.live:
            return self._continue(values, base, steps)
        return self.shown(self._set_up_and_train(values, base, steps))

    def _set_up_and_train(self, values: dict[str, Any], base: dict[str, Any] | None, steps: int) -> Outcome:
        """Train N steps without a live session: a run stopped in output.dir is continued from its state (never
        replaced), else a new one is set up from the form."""
        spec, demo, refused = self._prepare(values, base, "not started")
        if refused:
            return refused
        with self.view.lock:
            if self.runner.live:
                return self._continue(values, base, steps)
            refusal = self._refusal()
            if refusal:
                return refusal
            found = self.resumable(spec.output.dir, spec.train.max_steps)
            try:
                self.runner.send(TrainSteps(steps, RunRequest(spec, demo, resume=found is not None)))
            except (AlreadyRunning, NothingToDo) as exc:
                return Outcome(str(exc), [str(exc)])
            building = f"; building the demo in {demo} first" if demo else ""
            if found is not None:
                self.view.begin(spec.train.max_steps, f"continuing the run in {spec.output.dir} from step "
                                                      f"{found.step}: training {steps} steps")
                self.view.restore_history(read_history(spec.output.dir))
                return Outcome(f"continuing at step {found.step}: training {steps} steps, then pausing")
            self.view.begin(spec.train.max_steps, f"setting up {spec.output.name} to train {steps} steps of "
                                                  f"{spec.train.max_steps}, output {spec.output.dir}{building}")
        return Outcome(f"started: training {steps} steps, then pausing{building}")

    def _continue(self, values: dict[str, Any], base: dict[str, Any] | None, steps: int) -> Outcome:
        with self.view.lock:
            step = self.runner.step
            try:
                self.runner.send(TrainSteps(steps))
            except (AlreadyRunning, NothingToDo) as exc:
                return Outcome(str(exc), [str(exc)])
            self.view.resume_action(f"training {steps} more steps from step {step}")
        notes = []
        try:
            if self.resolve(values, base) != self.runner.spec:
                notes.append("the live session keeps the settings it was set up with; End training, then train "
                             "again to use the form's")
        except SpecError:
            notes.append("the form has problems; the live session goes on with the settings it was set up with")
        return Outcome(f"training {steps} more steps from step {step}", notes=notes)

    def validate_now(self) -> Outcome:
        """Sample with the current LoRA: after the current step while training, at once while paused."""
        with self.view.lock:
            try:
                how = self.runner.send(ValidateNow())
            except (AlreadyRunning, NothingToDo) as exc:
                return Outcome(str(exc), [str(exc)])
            if how == "requested":
                return Outcome("sampling after the current step")
            self.view.resume_action(f"sampling at step {self.runner.step}")
            return Outcome(f"sampling at step {self.runner.step}")

    def save_now(self) -> Outcome:
        """Save an intermediate LoRA: after the current step while training, at once while paused."""
        with self.view.lock:
            try:
                how = self.runner.send(SaveNow())
            except (AlreadyRunning, NothingToDo) as exc:
                return Outcome(str(exc), [str(exc)])
            if how == "requested":
                return Outcome("saving the LoRA after the current step")
            self.view.resume_action(f"saving the LoRA at step {self.runner.step}")
            return Outcome(f"saving the LoRA at step {self.runner.step}")

    def end_training(self) -> Outcome:
        """Save the final LoRA (if anything is unsaved) and free the live session."""
        with self.view.lock:
            try:
                self.runner.send(EndTraining())
            except (AlreadyRunning, NothingToDo) as exc:
                return Outcome(str(exc), [str(exc)])
            self.view.end_requested(f"ending the session at step {self.runner.step}: saving the final LoRA")
            return Outcome("ending: saving the final LoRA and freeing the session")

    def stop(self) -> str:
        with self.view.lock:
            action = self.runner.action
            if self.runner.running and self.runner.stop():
                if action == "train_steps":
                    text = ("stopping: training pauses after the current step and saves the LoRA; Train N steps "
                            "continues it")
                else:
                    text = "stopping: the run ends after the current step and saves the LoRA"
                self.view.request_stop(text)
                return text
            if self.runner.running:
                return f"busy with {action}: it ends by itself"
            if self.runner.live:
                return f"nothing is training: the session is paused at step {self.runner.step} (End training " \
                       "to finish)"
            return "no run in progress"

    def resume_offer(self, output_dir: str | None, max_steps: Any = None) -> str:  # noqa: ANN401
        """'An interrupted run was found at step N in DIR …' when output_dir holds an unfinished run, else ''."""
        found = self.offered_run(output_dir, max_steps)
        return found.text() if found else ""

    def remembered_output(self) -> tuple[str, int]:
        """(output.dir, train.max_steps) of the form the page shows on load: the remembered one, else the
        defaults. Reads only: restoring (which sets a broken file aside with a notice) is the job bar's."""
        spec = read_job(self.last_form.path, self.workdir)[0] if self.last_form.path.is_file() else None
        spec = spec or parse_spec(form.default_job(self.workdir))
        return spec.output.dir, spec.train.max_steps

    def offered_run(self, output_dir: str | None, max_steps: Any = None) -> InterruptedRun | None:  # noqa: ANN401
        """The run the resume offer is about (see resume_offer), or None."""
        if not output_dir or not str(output_dir).strip():
            return None
        if not self.folders.allows(output_dir):
            return None  # its files are not this app's to read; Start names the problem
        try:
            max_steps = int(max_steps) if max_steps not in (None, "") else None
        except (TypeError, ValueError):
            max_steps = None
        return self.resumable(self.folders.absolute(output_dir), max_steps)

    def actions(self) -> dict[str, str]:
        """Why each of the Run tab's buttons cannot act now, by name ('' when it can): start, train, resume,
        validate, save, stop, end. The buttons are disabled with the reason as their tooltip."""
        runner = self.runner
        running, live, action = runner.running, runner.live, runner.action
        training = running and action in ("start", "train_steps")
        paused = live and not running
        busy = f"busy with {action}; wait for it to finish" if running else ""
        new = busy or (SESSION_PAUSED.format(step=runner.step) if live else "") or (
            CAPTIONING_IN_PROGRESS if self.captioning.running else "")
        idle_reason = "nothing to {what}: start or train first"
        stopping = "stopping: the run ends after the current step" if self.view.status == "stopping" else ""
        return {
            "start": ALREADY_RUNNING if training else new,
            "resume": ALREADY_RUNNING if training else new,
            "train": "a run is in progress; Stop it, or wait for it to finish" if training else busy,
            "validate": "" if training or paused else busy or idle_reason.format(what="sample"),
            "save": "" if training or paused else busy or idle_reason.format(what="save"),
            "stop": stopping if training else busy or (
                f"nothing is training: the session is paused at step {runner.step} (End training to finish)"
                if live else "no run in progress"),
            "end": "" if paused else ("training is in progress: Stop pauses a Train N steps session, which End "
                                      "training then finishes" if training else busy or
                                      "no session to end: start or train first"),
        }

    def recheck(self, values: dict[str, Any], base: dict[str, Any] | None = None) -> list[str] | None:
        """The problems a Start of the form would be refused for now (the form, its paths, its files); a refused
        Start shown in the status line goes back to idle once there are none. None when the refusal shown is not
        the form's (a run to continue or start anew): the form cannot clear it."""
        if self.view.status == REFUSED and not self.view.refused_about_form:
            return None
        try:
            spec = self.resolve(values, base)
        except SpecError as exc:
            return all_in_page_words(exc.errors, self.labels)
        problems = self.folders.problems(spec_paths(spec)) or self.preflight(spec)
        if not problems:
            self.view.clear_refusal()
        return problems

    def poll(self) -> RunView:
        with self.view.lock:
            running = self.runner.running  # before draining: events of a thread that just ended are all queued
            self.view.apply(self.runner.drain())
            if not running:
                self.view.thread_ended()
        return self.view

    def refresh(self) -> dict[str, str]:
        """The runner's events drained into the view, and the buttons' states (see actions): the publisher's
        thread alone calls it, so any number of pages cost the run what one does."""
        with self.view.lock:
            self.poll()
            return self.actions()

    def captioning_shown(self) -> CaptionSnapshot:
        """The captioning job's state in the page's words (its messages name the command line's options), turned
        into them once per change."""
        snapshot, shown = self.captioning.snapshot(), self._caption_shown
        if shown is None or shown.version != snapshot.version:
            shown = self._caption_shown = replace(snapshot, line=flags_in_page_words(snapshot.line),
                                                  log=flags_in_page_words(snapshot.log))
        return shown

    def snapshot(self) -> Snapshot:
        """What the pages show: the published snapshot (nothing is drained or rendered per page)."""
        return self.publisher.latest().snapshot

    # ------------------------------------------------------------------ jobs as files

    def save_job(self, values: dict[str, Any], base: dict[str, Any] | None = None,
                 path: str | Path | None = None) -> tuple[Path | None, Outcome]:
        """Write the form's job as TOML to `path` (relative: from the workdir; empty: .studio/jobs/<name>.toml)."""
        try:
            spec = self.resolve(values, base)
        except SpecError as exc:
            return None, Outcome("not saved: the job has problems", all_in_page_words(exc.errors, self.labels))
        self.last_form.save(spec)
        typed = str(path or "").strip()
        try:
            target = self.folders.check(typed or default_job_path(self.jobs_dir, spec), "job file")
        except PathRefused as exc:
            return None, Outcome(f"not saved: {typed}", [str(exc)])
        if target.suffix.lower() != ".toml":  # a typo must never overwrite a file of another kind
            message = f"not saved: a job file's name ends in .toml (got {target.name})"
            return None, Outcome(message, [message])
        try:
            write_job(spec, target)
        except OSError as exc:
            return None, Outcome(f"not saved: {target}", [f"cannot write {target}: {exc.strerror or exc}"])
        return target, Outcome(f"saved {target}")

    def load_job(self, path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, Outcome]:
        """(form values, hidden fields, outcome) of a job TOML at a path the user typed (inside the allowed
        folders); relative paths in the job are taken from the job file's folder, as the CLI takes them."""
        try:
            target = self.folders.check(path, "job file")
        except PathRefused as exc:
            return None, None, Outcome(f"not loaded: {Path(str(path)).name}", [str(exc)])
        return self._load(target, target.name, target.parent)

    def load_upload(self, path: str | Path, name: str | None = None) -> tuple[dict[str, Any] | None,
                                                                          dict[str, Any] | None, Outcome]:
        """Like load_job, for a file the browser uploaded. Gradio keeps uploads in a folder of its own and the
        browser does not say where the file came from, so relative paths are taken from the workdir, and the
        notice says so when the job has any."""
        name = name or Path(path).name
        loaded = self._load(Path(path), name, self.workdir)
        if loaded[0] is not None and relative_paths(Path(path)):
            loaded[2].notes.append(f"{name}: its relative paths ({', '.join(relative_paths(Path(path)))}) were "
                                   f"taken from the app's workdir {self.workdir}; Load job with the file's path "
                                   "takes them from its folder, as the command line does")
        return loaded

    def _load(self, path: Path, name: str, base_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                                                                     Outcome]:
        spec, problems = read_job(path, base_dir, name)
        if spec is None:
            return None, None, Outcome(f"not loaded: {name}", problems)
        self.last_form.save(spec)
        notes = []
        if len(spec.data.datasets) > 1:
            notes.append(f"{name}: the form edits the first of {len(spec.data.datasets)} datasets; the others are "
                         "kept as loaded")
        return form.spec_to_values(spec), form.hidden_fields(spec), Outcome(f"loaded {name}", notes=notes)

    def remember(self, values: dict[str, Any], base: dict[str, Any] | None = None,
                 filled: dict[str, Any] | None = None) -> None:
        """Keep the form (and its last fill, see ui/presets.py) for the next page load, debounced; a form with
        problems leaves the last good one."""
        try:
            self.last_form.remember(self.resolve(values, base), filled)
        except SpecError:
            pass

    def restore(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str, dict[str, Any] | None]:
        """(form values, hidden fields, notice, the form's last fill or None) of the remembered form; values and
        hidden fields are None when there is none or it could not be read (the notice then says why)."""
        restored = self.last_form.restore(self.workdir)
        if restored.spec is None:
            return None, None, restored.notice, None
        return (form.spec_to_values(restored.spec), form.hidden_fields(restored.spec), restored.notice,
                restored.filled)

    # ------------------------------------------------------------------ dataset: check, captions

    def check_dataset(self, values: dict[str, Any], base: dict[str, Any] | None = None) -> DatasetCheck:
        """Health check and bucket plan of the form's datasets, as a run would make them (no model, no torch)."""
        problems = self.folders.problems(self.named_paths(self.dataset_paths(values, base)))
        if problems:
            details = "**Refused:**\n" + "\n".join(f"- {problem}" for problem in problems)
            return DatasetCheck("will not train", "will not train — a folder is outside the folders this app may "
                                                  "use", details)
        return check_form(values, base, self.workdir, self.demo_dir, self.labels)

    def named_paths(self, paths: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """(key, path) pairs with each key as the page names its control, for the folders' refusals."""
        return [(named(key, self.labels), path) for key, path in paths]

    @staticmethod
    def dataset_paths(values: dict[str, Any], base: dict[str, Any] | None = None) -> list[tuple[str, str]]:
        """(key, path) of the image, mask and reference folders of the form's datasets (the first from the form)."""
        datasets = form.values_to_dict(values, base).get("data", {}).get("datasets", [])
        found = []
        for index, entry in enumerate(datasets):
            for key in ("path", "masks", "conditioning"):
                if str(entry.get(key) or "").strip():
                    found.append((f"data.datasets[{index}].{key}", str(entry[key])))
        return found

    def caption_start(self, folder: str | None, kind: str, source: str | None = None,
                      **options: Any) -> Outcome:  # noqa: ANN401
        """Caption the folder's images in a background thread; refused while training runs or captioning does.

        options: trigger, prefix, suffix, max_length, overwrite, batch_size (see make_request).
        """
        if self.runner.running:
            return Outcome(f"not started: {TRAINING_IN_PROGRESS}", [TRAINING_IN_PROGRESS])
        labels = {**self.labels, **CAPTION_LABELS}
        try:
            if str(folder or "").strip():
                self.folders.check(folder, named(IMAGE_FOLDER, labels))
            source = (source or "").strip()
            if source and (is_local_path(source) or (self.workdir / source).is_dir()):
                self.folders.check(source, f"model folder of {named('caption_source', labels)}")
            request = make_request(folder or "", kind, source, workdir=self.workdir, labels=labels, **options)
            self.captioning.start(request)
        except (UserError, AlreadyRunning) as exc:
            return Outcome(f"not started: {exc}", [str(exc)])
        return Outcome(f"captioning {request.folder} with {request.kind}")

    def caption_stop(self) -> str:
        """Ask captioning to stop before its next batch; the captions written so far stay."""
        if not self.captioning.stop():
            return "no captioning in progress"
        return "stopping: captioning ends before the next batch (after loading, if the model is still loading)"

    def load_captions(self, folder: str | None) -> tuple[caption_editor.EditorState, Outcome]:
        """The caption editor's state for the form's image folder."""
        if not str(folder or "").strip():
            message = field_problem(IMAGE_FOLDER, "empty; type the folder of the images whose captions to edit",
                                    self.labels)
            return caption_editor.empty_state(), Outcome(message, [message])
        try:
            state = caption_editor.load_folder(self.folders.check(folder, named(IMAGE_FOLDER, self.labels)))
        except UserError as exc:
            return caption_editor.empty_state(), Outcome(str(exc), [str(exc)])
        count = len(state["names"])
        message = f"{count} image{'' if count == 1 else 's'} in {state['folder']}"
        notes = []
        if state["left_out"]:
            notes.append(f"{state['left_out']} images are left out: they or their captions resolve outside the "
                         "folder")
        if not count:
            message = f"no images in {state['folder']}"
        return state, Outcome(message, notes=notes)

    def save_captions(self, state: caption_editor.EditorState) -> tuple[caption_editor.EditorState, Outcome]:
        """Write the edited captions; refused while the captioner works in the same folder."""
        folder = self.captioning.folder
        if self.captioning.running and folder is not None and state.get("folder") == str(folder):
            message = "not saved: the captioner is writing captions in this folder; save when it has finished"
            return state, Outcome(message, [message])
        if state.get("folder") and not self.folders.allows(state["folder"]):
            message = f"not saved: {state['folder']} is outside the folders this app may use"
            return state, Outcome(message, [message])
        state, result = caption_editor.save_captions(state)
        return state, Outcome(result.message(), result.problems)

    # ------------------------------------------------------------------ uploads, run history

    def upload_dataset(self, files: list[tuple[str | Path, str]], name: str | None,
                       existing: str = KEEP) -> UploadResult:
        """Uploaded images, captions or zips into WORKDIR/datasets/<name> (see ui/uploads.py); refused while the
        captioner writes in that folder."""
        try:
            folder = dataset_folder(self.folders, name or "")
        except UserError as exc:
            return UploadResult(None, refused=[str(exc)])
        if self.captioning.running and self.captioning.folder == folder:
            return UploadResult(None, refused=[f"{folder}: the captioner is writing captions there; upload when it "
                                               "has finished"])
        return save_upload(files, folder, self.upload_limits, existing)

    def live_output_dir(self) -> Path | None:
        """The output folder of the session this app runs now (training, or paused), else None."""
        return self.runner.output_dir() if self.runner.running or self.runner.live else None

    def run_job(self, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, Outcome]:
        """(form values, hidden fields, outcome) of a listed run's job as it ran (its job.resolved.toml)."""
        try:
            run = self.history.find(name, self.live_output_dir())
        except UserError as exc:
            return None, None, Outcome(f"not loaded: {name}", [str(exc)])
        return self._load(run.folder / RESOLVED_JOB, f"{name}/{RESOLVED_JOB}", run.folder)  # as the CLI reads it
