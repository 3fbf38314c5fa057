"""Several GPUs from the app: the Run tab's "Several GPUs" section, and the one-training-at-a-time runner behind it.

The section lists this machine's NVIDIA GPUs (NVML, no torch), lets the user tick the ones to train on (one
process each; `CUDA_VISIBLE_DEVICES` of the launched processes), shows the mode the run will take (ddp or fsdp,
from the same `choose_mode` the trainer and the memory estimator use) and starts the form's job with `accelerate
launch` in other processes: the job is first saved as output.dir/job.toml, the processes train it as the CLI
does, and the Run view follows their events.jsonl like a run in this process (progress, loss, samples, log). Stop
writes output.dir/STOP, which rank 0 reads and every rank obeys after the same step.

Without a GPU the section says so. `FLUX_STUDIO_CPU_PROCESSES=1` in the app's environment adds "CPU processes
(testing)": gloo processes on the CPU, how the tests (and a developer without GPUs) run the real launch path.

The run goes through the app's runner (trainer/runners/app.py) as a LaunchRequest, so Studio and the Run view
treat it like a run in the trainer process: one training at a time, whichever kind.

Pure python at import (gradio is imported in `build`); no torch.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer import distributed
from trainer.demo import prepare_demo
from trainer.estimator.auto import choose_mode
from trainer.estimator.plans import mode_problems
from trainer.runners.launch import LaunchRequest
from trainer.spec import JobSpec, SpecError
from ui import form
from ui.feedback import problems_update
from ui.gpus import Gpu, list_gpus
from ui.jobs import Outcome, write_job

if TYPE_CHECKING:
    import gradio as gr

    from ui.studio import Studio

CPU_PROCESSES_ENV = "FLUX_STUDIO_CPU_PROCESSES"
CPU = "cpu"  # the device choice of CPU processes
CPU_LABEL = "CPU processes (testing)"
MODES = ("auto", "ddp", "fsdp")
JOB_FILE = "job.toml"  # the job the processes train, saved in its output.dir
ROOT = Path(__file__).resolve().parents[1]  # `-m trainer` runs from the project's folder
API_EXTRA = ("base", "multi_gpu_devices", "multi_gpu_processes", "multi_gpu_mode")


def cpu_processes_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the app was started with FLUX_STUDIO_CPU_PROCESSES set (to 1, true, yes)."""
    return environ.get(CPU_PROCESSES_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def hardware_text(gpus: Sequence[Gpu], cpu_allowed: bool) -> str:
    """What the section says about the machine, in Markdown."""
    if gpus:
        lines = [f"{len(gpus)} NVIDIA GPU{'s' if len(gpus) > 1 else ''} on this machine:"]
        lines += [f"- {gpu.label()}" for gpu in gpus]
        if len(gpus) == 1:
            lines.append("\nOne GPU trains in this app: use Start above. Several processes need two or more.")
    else:
        lines = ["No NVIDIA GPU found on this machine (NVML reports none): training on several GPUs needs two or "
                 "more."]
    if cpu_allowed:
        lines.append(f"\n{CPU_LABEL}: several gloo processes on the CPU, to test the launch without GPUs "
                     f"({CPU_PROCESSES_ENV} is set).")
    return "\n".join(lines)


def device_choices(gpus: Sequence[Gpu], cpu_allowed: bool) -> list[tuple[str, str]]:
    """(label, value) of the devices the user can tick: the GPUs by index, and the CPU when testing."""
    choices = [(gpu.label(), str(gpu.index)) for gpu in gpus]
    return choices + ([(CPU_LABEL, CPU)] if cpu_allowed else [])


def default_devices(gpus: Sequence[Gpu], cpu_allowed: bool) -> list[str]:
    """Every GPU when there are several; the CPU when testing without them; else nothing."""
    if len(gpus) > 1:
        return [str(gpu.index) for gpu in gpus]
    return [CPU] if cpu_allowed else []


# ---------------------------------------------------------------------- what a launch would do


@dataclass(frozen=True)
class Choice:
    """What the section's controls ask for."""

    devices: tuple[str, ...]  # GPU indices ("0", "3"), or ("cpu",)
    processes: int
    distributed: str = "auto"  # train.distributed for the run: auto, ddp, fsdp
    resume: bool = False  # continue the run stopped in output.dir from its latest state
    new_run: bool = False  # start anew over a stopped run, chosen: it is set aside once the new one trains

    @classmethod
    def of(cls, devices: Any, processes: Any, distributed: Any = "auto", resume: Any = False,  # noqa: ANN401
           new_run: Any = False) -> Choice:  # noqa: ANN401
        """From the controls' values (None, floats and strings as gradio and its API send them)."""
        try:
            count = int(processes)
        except (TypeError, ValueError):
            count = 0
        if isinstance(devices, str):
            devices = [devices]
        return cls(tuple(str(d).strip() for d in devices or ()), count, str(distributed or "auto"), bool(resume),
                   bool(new_run))

    @property
    def cpu(self) -> bool:
        return CPU in self.devices


@dataclass(frozen=True)
class Plan:
    """How the job would run: on which devices, how many processes, in which mode, and what stands in the way."""

    processes: int
    gpus: tuple[Gpu, ...]  # the ticked GPUs; empty with CPU processes
    cpu: bool
    mode: str
    reason: str
    problems: tuple[str, ...] = ()

    def devices(self) -> str:
        if self.cpu:
            return f"{self.processes} CPU processes (testing)"
        names = sorted({gpu.name for gpu in self.gpus})
        return (f"{self.processes} processes on GPU {', '.join(str(gpu.index) for gpu in self.gpus)}"
                + (f" ({', '.join(names)})" if names else ""))

    def describe(self) -> str:
        """'2 processes on GPU 0, 1 (NVIDIA H100 80GB HBM3) — ddp (auto: the base fits one GPU …)'."""
        return f"{self.devices()} — {self.mode} ({self.reason})"

    def markdown(self) -> str:
        text = f"**Plan:** {self.describe()}"
        if self.problems:
            text += "\n\n**Cannot start:**\n" + "\n".join(f"- {problem}" for problem in self.problems)
        return text


def with_distributed(spec: JobSpec, mode: str) -> JobSpec:
    """A copy of `spec` with train.distributed = `mode` (the section's menu), the spec itself left as it is."""
    if mode == spec.train.distributed:
        return spec
    return spec.model_copy(update={"train": spec.train.model_copy(update={"distributed": mode})})


def choice_problems(choice: Choice, gpus: Sequence[Gpu], cpu_allowed: bool) -> list[str]:
    problems = []
    ticked = [device for device in choice.devices if device != CPU]
    known = {str(gpu.index) for gpu in gpus}
    if choice.distributed not in MODES:
        problems.append(f"train.distributed: {choice.distributed!r} is not one of {', '.join(MODES)}")
    if choice.cpu and ticked:
        problems.append(f"{CPU_LABEL} and GPUs do not mix: tick one or the other")
    elif choice.cpu and not cpu_allowed:
        problems.append(f"{CPU_LABEL} are for tests: start the app with {CPU_PROCESSES_ENV}=1 to use them")
    elif not choice.devices:
        problems.append("no device ticked: tick two or more GPUs" if gpus else "no NVIDIA GPU on this machine")
    unknown = [device for device in ticked if device not in known]
    if unknown:
        problems.append(f"no GPU {', '.join(unknown)} on this machine" + (
            f" (it has {', '.join(sorted(known, key=int))})" if known else ""))
    if ticked and len(ticked) < 2:
        problems.append("tick two or more GPUs (one GPU trains in this app: use Start above)")
    elif ticked and not unknown and choice.processes != len(ticked):
        problems.append(f"one process per GPU: {len(ticked)} GPUs ticked for {choice.processes} processes")
    elif choice.processes < 2:
        problems.append("several processes means at least 2")
    return problems


def plan(spec: JobSpec, choice: Choice, gpus: Sequence[Gpu], cpu_allowed: bool | None = None) -> Plan:
    """The run of `spec` (its train.distributed already set from the choice) on the chosen devices."""
    allowed = cpu_processes_allowed() if cpu_allowed is None else cpu_allowed
    chosen = () if choice.cpu else tuple(gpu for gpu in gpus if str(gpu.index) in choice.devices)
    # Each process sees one GPU; the smallest one decides whether the base must be split (as every rank must fit).
    vram = min((gpu.total_gib for gpu in chosen), default=None)
    processes = max(choice.processes, 1)
    mode, reason = choose_mode(spec, processes, vram)
    problems = choice_problems(choice, gpus, allowed) + mode_problems(spec, mode)
    return Plan(processes, chosen, choice.cpu, mode, reason, tuple(problems))


def launch_env(found: Plan, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The processes' environment: this app's, with the chosen devices, the project importable, and CPU threads
    shared out (the app keeps all cores but one for itself; N processes each taking that would fight)."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"  # a rank that dies has its last words in launch.log
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // found.processes))
    if found.cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo on the CPU (trainer/distributed.py reads it)
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("ACCELERATE_USE_CPU", None)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's own order is fastest first; NVML's indices are bus order
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu.index) for gpu in found.gpus)
    return env


def training_command(job: Path, found: Plan, resume: bool, port: int) -> list[str]:
    """`accelerate launch … -m trainer train JOB --no-progress`, the launcher run as a module of this Python: the
    app may run from its virtual environment without it on PATH."""
    command = distributed.launch_command(job, found.processes, resume=resume, port=port)
    assert command[:2] == ["accelerate", "launch"], command
    return [sys.executable, "-m", "accelerate.commands.launch", *command[2:]]


def free_port() -> int:
    """A free port for the processes' rendezvous: a second app, or a run that has not let go of its port yet,
    may hold accelerate's default."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------- what the buttons do


def plan_for_form(studio: Studio, values: dict[str, Any], base: dict[str, Any] | None, choice: Choice,
                  cpu_allowed: bool | None = None) -> str:
    """The section's plan line for the form's job, in Markdown."""
    try:
        spec = studio.resolve(values, base)
    except SpecError as exc:
        return "**The job has problems:**\n" + "\n".join(f"- {problem}" for problem in exc.problems)
    return plan(with_distributed(spec, choice.distributed), choice, list_gpus(), cpu_allowed).markdown()


def start(studio: Studio, values: dict[str, Any], base: dict[str, Any] | None, choice: Choice,
          cpu_allowed: bool | None = None) -> Outcome:
    """Save the form's job as output.dir/job.toml and train it in several processes on the chosen devices.
    Over a run stopped in output.dir it asks first, as Start does (Studio.launch): `choice.resume` continues it,
    `choice.new_run` starts anew (the stopped run is set aside once the new one's first step is about to train).
    `cpu_allowed`: whether CPU processes may be chosen (None: FLUX_STUDIO_CPU_PROCESSES says). A refusal is what
    the Run tab's status line shows, as for Start."""
    outcome = studio.shown(_start(studio, values, base, choice, cpu_allowed))
    studio.publisher.publish()  # the next poll (page or API) shows what this Start did, as after Start
    return outcome


def _start(studio: Studio, values: dict[str, Any], base: dict[str, Any] | None, choice: Choice,
           cpu_allowed: bool | None) -> Outcome:
    verb = "not resumed" if choice.resume else "not started"
    # Studio's own checks of a form about to run (spec, allowed folders, missing files, the demo to build), so both
    # Start buttons refuse the same jobs the same way.
    spec, demo, refused = studio._prepare(values, base, verb)
    if refused:
        return refused
    spec = with_distributed(spec, choice.distributed)
    found = plan(spec, choice, list_gpus(), cpu_allowed)
    if found.problems:
        return Outcome(f"{verb}: {found.problems[0]}", list(found.problems))
    job = Path(spec.output.dir) / JOB_FILE
    building = f"; building the demo in {demo} first" if demo else ""
    what = "resuming" if choice.resume else "starting"

    def start_processes() -> Outcome | None:
        try:
            write_job(spec, job)
        except OSError as exc:
            message = f"{verb}: cannot write {job}: {exc.strerror or exc}"
            return Outcome(message, [message])
        command = training_command(job, found, choice.resume, free_port())
        # the demo is built as the trainer process builds it: the same events, the same failure
        studio.runner.start(LaunchRequest(command, Path(spec.output.dir), env=launch_env(found), cwd=ROOT,
                                          prepare=functools.partial(prepare_demo, demo) if demo else None,
                                          description=found.describe()))
        return None

    refused = studio.launch(spec, choice.resume, verb, start_processes,
                            f"{what} {spec.output.name} on {found.describe()}: {spec.train.max_steps} steps, "
                            f"job {job}{building}", choice.new_run)
    return refused or Outcome(f"{'resumed' if choice.resume else 'started'} on {found.devices()} ({found.mode}): "
                              f"{spec.train.max_steps} steps{building}")


# ---------------------------------------------------------------------- the section


def build(fields: dict[str, gr.components.Component], studio: Studio,
          base: gr.State) -> Callable[[gr.components.Component, gr.components.Component], None]:
    """The "Several GPUs" section (an accordion, where it is called); returns `connect(status, problems)`, which
    wires its Start button to the Run tab's status line and problems box once they exist."""
    import gradio as gr

    gpus, cpu_allowed = list_gpus(), cpu_processes_allowed()  # CPU processes: decided once, when the app starts
    choices = device_choices(gpus, cpu_allowed)
    selected = default_devices(gpus, cpu_allowed)
    with gr.Accordion("Several GPUs", open=False, elem_id="multi-gpu") as section:
        gr.Markdown(hardware_text(gpus, cpu_allowed), elem_id="multi-gpu-hardware")
        with gr.Row(visible=bool(choices)):
            devices = gr.CheckboxGroup(choices, value=selected, label="Devices (one process per GPU)", scale=3,
                                       elem_id="multi-gpu-devices")
            # No `minimum`: gradio would refuse one ticked GPU's count with an error toast; the plan says why instead
            processes = gr.Number(len([d for d in selected if d != CPU]) or 2, label="Processes", precision=0,
                                  step=1, scale=1, min_width=100, elem_id="multi-gpu-processes",
                                  info="follows the GPUs ticked; with CPU processes, how many")
            mode = gr.Dropdown(list(MODES), value="auto", label="Mode (train.distributed)", scale=1, min_width=120,
                               info="ddp: a copy per GPU; fsdp: the frozen model sharded; auto: fsdp only when one "
                                    "GPU cannot hold the base")
        plan_text = gr.Markdown("", elem_id="multi-gpu-plan", visible=bool(choices))
        launch = gr.Button("Start on several GPUs", variant="primary", visible=bool(choices),
                           elem_id="multi-gpu-start")
        # A Start over a stopped run asks, as the Run tab's Start does: these answer it on several GPUs.
        with gr.Row(visible=False, elem_id="multi-gpu-ask") as ask:
            answers = {"resume": gr.Button("Continue on several GPUs", variant="primary", elem_id="multi-gpu-resume"),
                       "new_run": gr.Button("Start a new run on several GPUs", elem_id="multi-gpu-start-new")}

    inputs = {**{form.api_name(k): fields[k] for k in form.FORM_KEYS}, "base": base, "multi_gpu_devices": devices,
              "multi_gpu_processes": processes, "multi_gpu_mode": mode}

    def choice_of(values: dict[str, Any]) -> Choice:
        return Choice.of(values.pop("multi_gpu_devices", None), values.pop("multi_gpu_processes", None),
                         values.pop("multi_gpu_mode", "auto"))

    def follow_devices(ticked: list[str] | None) -> Any:  # noqa: ANN401 - a gradio update
        """One process per ticked GPU."""
        count = len([device for device in ticked or () if device != CPU])
        return gr.update(value=count) if count else gr.skip()

    devices.change(follow_devices, devices, processes, api_visibility="private", show_progress="hidden")

    def multi_gpu_plan(values: dict[str, Any]) -> str:
        """How the form's job would run on the chosen devices: processes, mode (ddp/fsdp) and why, problems."""
        choice = choice_of(values)
        return plan_for_form(studio, values, values.pop("base", None), choice, cpu_allowed)

    gr.on([section.expand, devices.change, processes.change, mode.change], form.keyword_handler(
        multi_gpu_plan, extra=API_EXTRA), inputs_kwargs=inputs, outputs=plan_text, api_name="multi_gpu_plan",
        show_progress="hidden")

    def connect(status: gr.components.Component, problems: gr.components.Component) -> None:
        _connect_starts(studio, inputs, choice_of, cpu_allowed, launch, answers, [status, problems])
        # The answers show while the form's output.dir holds a stopped run, as the resume offer does.
        def ask_row(output_dir: str, max_steps: Any) -> tuple[Any, Any]:  # noqa: ANN401
            return _ask_row(studio, output_dir, max_steps)

        gr.on([section.expand, status.change], ask_row, [fields["output.dir"], fields["train.max_steps"]],
              [ask, answers["resume"]], api_visibility="private", show_progress="hidden")

    return connect


def _ask_row(studio: Studio, output_dir: str, max_steps: Any) -> tuple[Any, Any]:  # noqa: ANN401
    """Whether the answers to a Start over a stopped run show (while output_dir holds one), and the Continue label."""
    import gradio as gr

    stopped = studio.offered_run(output_dir, max_steps)
    label = f"Continue at step {stopped.step} on several GPUs" if stopped else gr.skip()
    return gr.update(visible=stopped is not None), label


def _connect_starts(studio: Studio, inputs: dict[str, Any], choice_of: Callable[[dict[str, Any]], Choice],
                    cpu_allowed: bool, launch: gr.Button, answers: dict[str, gr.Button],
                    answer: list[gr.components.Component]) -> None:
    """Start on several GPUs, and the two answers it may ask for (continue the stopped run, start a new one): each
    answers the status line and the problems box."""
    def handler(how: str) -> Callable[[dict[str, Any]], tuple[str, Any]]:
        def multi_gpu_start(values: dict[str, Any]) -> tuple[str, Any]:
            """Save the form's job as output.dir/job.toml and train it with accelerate launch on the ticked
            devices; the Run view follows it. Over a run stopped in output.dir it asks first: multi_gpu_resume
            continues that run, multi_gpu_start_new starts anew (the stopped run moves to earlier_runs/<date-time>
            once the new one's first step is about to train)."""
            choice = choice_of(values)
            choice = Choice(choice.devices, choice.processes, choice.distributed, how == "resume", how == "new_run")
            outcome = start(studio, values, values.pop("base", None), choice, cpu_allowed)
            return outcome.message, problems_update(outcome)

        return multi_gpu_start

    for how, button, name in (("ask", launch, "multi_gpu_start"), ("resume", answers["resume"], "multi_gpu_resume"),
                              ("new_run", answers["new_run"], "multi_gpu_start_new")):
        button.click(form.keyword_handler(handler(how), extra=API_EXTRA), inputs_kwargs=inputs, outputs=answer,
                     api_name=name, concurrency_limit=1)
