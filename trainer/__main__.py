"""Command line: `python -m trainer demo | train | validate | estimate | caption | fabricate`.

Problems the user can fix print as `error: ...` lines and exit 2; anything else exits 1 with one line, and
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from trainer.errors import UserError
from trainer.spec import JobSpec, SpecError, load_spec, resolve_paths

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def _load_job(path: str, overrides: list[str], preset: str | None = None) -> JobSpec:
    """The job file under its preset (the file's values and then --set win over the preset's)."""
    if not preset:
        return resolve_paths(load_spec(path, overrides), Path(path).expanduser().resolve().parent)
    from trainer.profiles import find_preset, list_presets

    chosen = find_preset(preset)
    spec = load_spec(path, overrides, chosen.spec)
    if (spec.model.family, spec.model.flavour) != (chosen.family, chosen.flavour):
        # its sizes and precisions are chosen for that model: under another they would mislead
        fitting = ", ".join(p.name for p in list_presets(spec.model.family, spec.model.flavour)) or "none"
        raise SpecError([f"--preset {preset}: it is for {chosen.family} {chosen.flavour}, but the job trains "
                         f"{spec.model.family} {spec.model.flavour}; choose one of its presets ({fitting}) or set "
                         "model.flavour"])
    return resolve_paths(spec, Path(path).expanduser().resolve().parent)


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import CACHE_ENV, FAMILIES, build_demo, ensure_demo

    families = FAMILIES if args.family == "all" else (args.family,)
    print(f"building the demo ({', '.join(families)}) in {Path(args.out).resolve()} ...", flush=True)
    # With a shared demo folder set (the tests set one), every family's build is made there once and copied
    job = ensure_demo(args.out) if os.environ.get(CACHE_ENV) else build_demo(args.out, families)
    print(f"done. train it with:\n  python -m trainer train {job}")
    edit = job.parent / "job_edit.toml"
    if edit.is_file():
        print(f"or train on edit pairs (reference -> target) with:\n  python -m trainer train {edit}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from trainer.data.health import check_datasets
    from trainer.data.planning import plan_training_items
    from trainer.preflight import check_files, model_source

    spec = _load_job(args.job, args.set, args.preset)
    problems = check_files(spec)
    if problems:
        raise SpecError(problems, args.job)
    health = check_datasets(spec)
    print(health.table())
    if health.verdict == "will not train":
        raise UserError(f"{args.job}: the dataset cannot train; see the table above")
    items, plan = plan_training_items(spec, health)
    print(plan.report())
    images = len({item.image_path for item in items})
    print(f"ok: {args.job} is valid — {spec.model.family} {spec.model.flavour} from {model_source(spec)}, "
          f"{images} images, {spec.train.max_steps} steps, output in {spec.output.dir}")
    from trainer.adapters import flavour_preset_counts

    counts = flavour_preset_counts(spec.model.family, spec.model.flavour)
    presets = ", ".join(f"{name} {count}" for name, count in counts.items())
    hits = f"{counts[spec.lora.targets]} modules" if spec.lora.targets in counts else "a custom regex"
    print(f"lora.targets '{spec.lora.targets}' hits {hits} (presets: {presets})")
    return 0


class _ConsoleProgress:
    """Shows the run's events in a terminal: a progress bar for steps, a line for everything else."""

    def __init__(self, show_bar: bool) -> None:
        self.show_bar = show_bar
        self.bar = None
        self.download_bar = None
        self.download_shown: tuple[int, int] | None = None
        self.failed_message = ""

    def _download(self, event: object) -> None:
        """A hub download: a bar of bytes with the files done (the app's words on each line without a bar: when a
        file completes or another tenth arrives)."""
        from tqdm import tqdm

        if not self.show_bar:
            tenth = 10 * event.downloaded_bytes // event.total_bytes if event.total_bytes else -1
            if (event.files_done, tenth) != self.download_shown:
                self.download_shown = (event.files_done, tenth)
                print(event.describe(), flush=True)
            return
        if self.download_bar is None:
            self.download_bar = tqdm(unit="B", unit_scale=True, dynamic_ncols=True, desc=f"downloading {event.repo_id}")
        bar = self.download_bar
        if event.total_bytes and bar.total != event.total_bytes:
            bar.total = event.total_bytes
        bar.update(event.downloaded_bytes - bar.n)
        if event.files_total:
            bar.set_postfix_str(f"{event.files_done}/{event.files_total} files")

    def __call__(self, event: object) -> None:
        from tqdm import tqdm

        from trainer import events

        if isinstance(event, events.DownloadProgress):
            self._download(event)
            return
        if self.download_bar is not None:  # the download is over once anything else happens
            self.download_bar.close()
            self.download_bar = None
        if isinstance(event, events.Progress):
            if self.bar is None and self.show_bar:
                self.bar = tqdm(total=event.max_steps, unit="step", dynamic_ncols=True)
            if self.bar is not None:
                self.bar.update(event.step - self.bar.n)
                self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.learning_rate:.2e}")
            return
        line = self._describe(event)
        if line:
            (self.bar.write if self.bar is not None else print)(line)
        if isinstance(event, events.RunFinished) and self.bar is not None:
            self.bar.close()

    def _describe(self, event: object) -> str:
        from trainer import events

        if isinstance(event, events.PhaseChanged) and event.phase != "training":
            return f"[{event.phase}] {event.detail}"
        if isinstance(event, events.SampleSaved):
            return f"sample (step {event.step}): {event.path}"
        if isinstance(event, events.LoraSaved):
            return f"LoRA saved (step {event.step}): {event.path}"
        if isinstance(event, events.LogMessage) and event.level != "error":
            return f"{event.level}: {event.message}"
        if isinstance(event, events.RunFinished) and event.status != "failed":  # a failure: main() prints it once
            return f"run {event.status} at step {event.step}. {event.message}"
        return ""


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.preflight import check_files
    from trainer.quiet import silence_library_noise

    spec = _load_job(args.job, args.set, args.preset)
    problems = check_files(spec)  # before torch loads: a mistake in the job is reported at once
    if problems:
        raise SpecError(problems)
    silence_library_noise()
    from trainer import distributed
    from trainer.session import Session

    # Under `accelerate launch` every process runs this; the session finds its rank (rank 0 alone reports).
    try:
        # a run whose RAM will not fit stops before loading (the verdict names the cheapest fix) unless --force
        session = Session(spec, emit=_ConsoleProgress(show_bar=not args.no_progress), resume=args.resume,
                          ram_check="warn" if args.force else "refuse")
        try:
            session.run()
        finally:
            session.end()
    finally:
        distributed.shutdown()
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from trainer.estimator.job import estimate_job
    from trainer.preflight import check_model

    gpu_vram, gpu = args.gpu_vram, None
    if args.gpus < 1:
        raise UserError(f"--gpus: {args.gpus} is not a number of GPUs (1 or more)")
    if args.gpu is not None:
        if args.gpu_vram is not None:
            raise UserError("--gpu and --gpu-vram both give the GPU's memory; use one")
        from trainer.profiles import gpu_vram_gib

        gpu_vram, gpu = gpu_vram_gib(args.gpu)
    spec = _estimated_job(args)
    problems = check_model(spec)  # an estimate of another model than the folder holds would mislead
    if problems:
        raise SpecError(problems, args.job)
    result = estimate_job(spec, gpu_vram_gib=gpu_vram, gpus=args.gpus).to_json()
    if gpu is not None:
        result["gpu"] = gpu
    result["ram_verdict"] = _ram_line(spec, gpu_vram)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if gpu is not None:
        print(f"GPU: {gpu}" + (f", {gpu_vram:g} GiB usable" if gpu_vram else ""))
    shared = result["distributed"]
    if shared["gpus"] > 1:
        # the mode the trainer would pick (train.distributed; auto as trainer/estimator/auto.py decides)
        print(f"{shared['gpus']} GPUs, {shared['mode']} ({shared['reason']}): VRAM per GPU, RAM for all "
              f"{shared['gpus']} processes")
    print(f"{'phase':28}{'VRAM GiB':>10}{'RAM GiB':>10}")
    for phase, memory in result["phases"].items():
        print(f"{phase:28}{memory['vram_gib']:10.2f}{memory['ram_gib']:10.2f}")
    for title, key in (("training step on the GPU", "breakdown"), ("training step in RAM", "ram_breakdown"),
                       ("models", "components")):
        items = ", ".join(f"{k} {v:.2f}" for k, v in result[key].items() if v)
        print(f"\n{title} (GiB): {items}")
    print(f"peak: VRAM {result['vram_gib']:.2f} GiB, RAM {result['ram_gib']:.2f} GiB")
    print(f"first run (text embeddings computed): RAM {result['first_run_ram_gib']:.2f} GiB; on this machine: "
          f"{result['ram_verdict']}")
    if result.get("verdict"):
        print(f"verdict: {result['verdict']}" + (f" — {result['suggestion']}" if result.get("suggestion") else ""))
    for note in result.get("notes", []):
        print(f"note: {note}")
    return 0


def _estimated_job(args: argparse.Namespace) -> JobSpec:
    """The job file (under --preset when given), or without a job the preset alone as the app offers it: its
    hardware profile under it, the model from its hub repo, a dataset folder to be named, --set on top."""
    if args.job is not None:
        return _load_job(args.job, args.set, args.preset)
    if args.preset is None:
        raise UserError("estimate: give a job file, --preset NAME, or both")
    from trainer.profiles import ProfileError, apply_layers, find_preset, get_profile
    from trainer.spec import apply_overrides, parse_spec

    try:
        preset = find_preset(args.preset)
    except ProfileError as exc:
        raise UserError(f"--preset: {exc}") from None
    layers = apply_layers({}, get_profile(preset.profile), preset, {"data": {"datasets": [{"path": "dataset"}]}})
    return parse_spec(apply_overrides(layers, args.set), f"preset {preset.name}")


def _ram_line(spec: JobSpec, gpu_vram: float | None) -> str:
    """The RAM verdict of this job on this machine (first run unless its text embeddings are cached on disk)."""
    from trainer.estimator.auto import resolve_lowvram
    from trainer.memory.system_ram import available_ram_gib, ram_verdict

    available = available_ram_gib()
    plan = resolve_lowvram(spec, gpu_vram, ram_gib=available)  # what a run here would choose for this RAM
    return ram_verdict(spec, plan, gpu_vram, available).line()


_PRESET_HELP = ("a preset under the job (a file of presets/ without .toml, or a path): the job's own values and "
                "--set win over it")


def cmd_fabricate(args: argparse.Namespace) -> int:
    from trainer.fabric.make import fabricate, flavour_of, needed_bytes

    flavour = flavour_of(args.flavour)
    need = needed_bytes(flavour, args.layout)
    print(f"fabricating {flavour.label} ({args.layout} layout, seed {args.seed}): {need / 1024**3:.1f} GiB of "
          f"weights into {Path(args.out).resolve()} ...", flush=True)
    made = fabricate(flavour, args.layout, args.out, seed=args.seed, progress=lambda line: print(line, flush=True))
    print(f"done in {made.seconds:.0f} s: {made.bytes / 1024**3:.1f} GiB in {made.folder}; model.source = "
          f"'{made.source}'" + "".join(f", model.{slot} = '{path}'" for slot, path in made.files.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Flux LoRA Studio, headless.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the tiny offline demo models, dataset and job.toml")
    demo.add_argument("--out", required=True, help="folder to build the demo in")
    demo.add_argument("--family", choices=["all", "flux2", "flux1"], default="all")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")
    demo.set_defaults(func=cmd_demo)

    for name, func, text in (("train", cmd_train, "train a LoRA from a job file"),
                             ("validate", cmd_validate, "check a job file and every file it names")):
        command = sub.add_parser(name, help=text)
        command.add_argument("job", help="job TOML file")
        command.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override a setting; the value is a TOML literal, a bare word is a string")
        command.add_argument("--preset", metavar="NAME", help=_PRESET_HELP)
        command.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "train":
            command.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
            command.add_argument("--resume", action="store_true",
                                 help="continue exactly from the latest training state in output.dir")
            command.add_argument("--force", action="store_true",
                                 help="start even when the RAM verdict says the run will not fit")
        command.set_defaults(func=func)
    estimate = sub.add_parser("estimate", help="predict peak VRAM and RAM per phase, without loading a model")
    estimate.add_argument("job", nargs="?", help="job TOML file")
    estimate.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    estimate.add_argument("--preset", metavar="NAME", help=_PRESET_HELP + "; without a job, the preset alone as the "
                          "app offers it (on its hardware profile)")
    estimate.add_argument("--gpu-vram", type=float, metavar="GIB", help="the GPU's memory, for a verdict")
    estimate.add_argument("--gpu", metavar="PROFILE",
                          help="a hardware profile (e.g. rtx-3060ti-8gb; see hardware_profiles/), 'detect', or a "
                               "number of GiB: its usable memory is judged against")
    estimate.add_argument("--gpus", type=int, default=1,
                          help="GPUs of this size, one process each: VRAM per GPU under train.distributed (auto: "
                               "ddp, or fsdp when the base needs splitting), RAM for all of them")
    estimate.add_argument("--json", action="store_true", help="one JSON object")
    estimate.add_argument("--debug", action="store_true", help="show tracebacks")
    estimate.set_defaults(func=cmd_estimate)
    from trainer.fabric.make import FLAVOURS, LAYOUTS

    fab = sub.add_parser("fabricate", help="write seeded random weights of a flavour's real shapes (for rehearsals)")
    fab.add_argument("flavour", choices=list(FLAVOURS))
    fab.add_argument("--layout", choices=list(LAYOUTS), default="hub",
                     help="hub: the diffusers repo layout; comfy: ComfyUI's single files plus a source/ folder")
    fab.add_argument("--out", required=True, help="folder to create (must not exist)")
    fab.add_argument("--seed", type=int, default=0)
    fab.add_argument("--debug", action="store_true", help="show tracebacks")
    fab.set_defaults(func=cmd_fabricate)
    from trainer.captioning_cli import add_parser as add_caption_parser

    add_caption_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from trainer.quiet import silence_library_noise

    silence_library_noise()  # before any command imports torch or diffusers
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        if args.debug:
            traceback.print_exc()
        where = f"{exc.source}: " if exc.source else ""
        for problem in exc.errors:  # one line per problem, naming its field
            print(f"error: {where}{problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
