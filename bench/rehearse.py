"""Rehearse a real-size run on this machine: the user's own path on fabricated weights of the real shapes.

    flock /tmp/bigrun.lock nice .venv/bin/python bench/rehearse.py klein-base-4b --layout hub
    ... FLAVOUR [--layout hub|comfy] [--preset NAME] [--fab-dir /work/fab] [--steps 2] [--resolution 256]

What it does: fabricates the flavour (python -m trainer fabricate; reused when a complete one is there), writes a
few generated images, and runs `python -m trainer train` with the flavour's smallest-tier preset (its hardware
profile beneath it, as the app merges them), the CPU as the device, N steps at R px, one 2-step sample after
training and every LoRA format the family has. While it runs, the trainer's resident memory is sampled every 50 ms
(/proc/PID/status: anonymous, file-backed, shared) and cut into phases by its events.jsonl. It prints per phase
the estimator's prediction for this CPU-only run (trainer/estimator/cpu_only.py: device and host are the same RAM, and
the prediction is resident memory, anonymous and file-backed together), the measured peak, the difference and
the wall time; then s/step; then each written LoRA loaded at real width by diffusers' load_lora_weights.

Before anything starts it refuses (exit 2, one line) when the disk cannot take the fabricated model or the RAM
the run's predicted peak. --json FILE writes the table as JSON too.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rehearse_job import build_job, check_disk_and_ram, family_formats  # noqa: E402
from trainer.errors import UserError  # noqa: E402

GIB = 1024**3
SAMPLE_SECONDS = 0.05
PHASE_LINE = re.compile(r"^\[([a-z ]+)\] ?(.*)$")  # the trainer's console line for a phase it enters
# estimator phase -> the rehearsal's phase names (the trainer's events)
# the session loads twice: the pipeline with its text encoders and VAE first, the transformer once the caches are
# filled (trainer/session.py); each has its own row and prediction
PHASES = ("loading", "caching text embeddings", "caching latents", "loading transformer", "training step",
          "sampling", "saving")
PREDICTED_AS = {"loading": "loading", "caching text embeddings": "caching text embeddings",
                "loading transformer": "loading transformer",
                "caching latents": "caching latents", "training step": "training step",
                "sampling": "validation sampling", "saving": "saving"}


def _status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _reset_high_water_mark(pid: int) -> None:
    """Linux's peak RSS (VmHWM) of `pid` starts again from its RSS now: a phase's peak is then exact, not the
    highest of the 50 ms samples (a short-lived allocation can fall between two)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the samples alone
        pass


class Watcher(threading.Thread):
    """Samples the trainer's memory and follows its events: peak RSS (and its anon/file split) per phase."""

    def __init__(self, pid: int, events: Path, log: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.pid, self.events, self.log = pid, events, log
        self.phase = "starting"
        self.peaks: dict[str, dict[str, int]] = {}  # the sample with the highest RSS per phase
        self.high: dict[str, int] = {}  # the kernel's peak RSS per phase (VmHWM, reset as each phase starts)
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}  # a phase met more than once adds up
        self.steps: list[float] = []
        self.done = threading.Event()
        self._offset = self._log_offset = 0

    def _enter(self, phase: str) -> None:
        now = time.time()
        spent = now - self.started.get(self.phase, now)
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + spent
        status = _status(self.pid)  # the old phase's last word: its peak up to now
        if status:
            self.high[self.phase] = max(self.high.get(self.phase, 0), status.get("VmHWM", 0))
        peak = self.peaks.get(self.phase)
        if peak and "VmRSS" in peak:  # as it happens: a rehearsal stopped halfway still told what it saw
            top = max(peak["VmRSS"], self.high.get(self.phase, 0))
            print(f"  [{self.phase}] peak RSS {top / GIB:.2f} GiB (sampled {peak['VmRSS'] / GIB:.2f}: anon "
                  f"{peak.get('RssAnon', 0) / GIB:.2f}, file {peak.get('RssFile', 0) / GIB:.2f}), {spent:.0f} s",
                  flush=True)
        self.phase = phase
        self.started[phase] = now
        _reset_high_water_mark(self.pid)

    def _read_events(self) -> None:
        if not self.events.is_file():
            return
        with open(self.events, encoding="utf-8") as handle:
            handle.seek(self._offset)
            for line in handle:
                if not line.endswith("\n"):
                    break
                self._offset += len(line.encode())
                event = json.loads(line)
                # the trainer writes its events file only once training starts (the earlier ones all at once):
                # its other phases come from its log as they happen
                if event["event"] == "phase" and (self.log is None or event["phase"] == "training"):
                    self._phase(event["phase"], event.get("detail", ""))
                elif event["event"] == "progress":
                    self.steps.append(event["step_seconds"])

    def _phase(self, phase: str, detail: str) -> None:
        phase = "training step" if phase == "training" else phase
        if phase == "loading" and detail.startswith("transformer"):
            phase = "loading transformer"
        if phase != self.phase:  # caching latents and sampling say so more than once
            self._enter(phase)

    def _read_log(self) -> None:
        """'[phase] detail' lines of the trainer's console output, as they are printed."""
        if self.log is None or not self.log.is_file():
            return
        with open(self.log, "rb") as handle:
            handle.seek(self._log_offset)
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break
                self._log_offset += len(raw)
                found = PHASE_LINE.match(raw.decode("utf-8", "replace"))
                if found:
                    self._phase(found[1], found[2])

    def run(self) -> None:
        while not self.done.is_set():
            self._read_log()
            self._read_events()
            status = _status(self.pid)
            if not status or "VmRSS" not in status:  # gone, or a zombie
                break
            peak = self.peaks.setdefault(self.phase, {"VmRSS": 0})
            if status["VmRSS"] > peak["VmRSS"]:
                self.peaks[self.phase] = status
            self.high[self.phase] = max(self.high.get(self.phase, 0), status.get("VmHWM", 0))
            time.sleep(SAMPLE_SECONDS)
        self._read_log()
        self._read_events()
        self._enter("ended")


def run_trainer(job: Path, events: Path, log: Path, command: list[str] | None = None,
                console: bool | None = None) -> tuple[int, Watcher, float]:
    """`python -m trainer train job --no-progress` as a user runs it (or `command`), watched; (exit code, watcher,
    seconds). `console`: phases from its console lines (default: for the trainer's own command)."""
    started = time.time()
    own = command is None
    command = command or [sys.executable, "-m", "trainer", "train", str(job), "--no-progress"]
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**_env(), "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
        # the trainer's phases from its console lines; a given command (the text priming) writes events live
        watcher = Watcher(process.pid, events, log if (own if console is None else console) else None)
        watcher.start()
        try:
            code = process.wait()
        finally:
            if process.poll() is None:  # this script was stopped: the trainer stops with it
                process.terminate()
                process.wait()
    watcher.done.set()
    watcher.join()
    return code, watcher, time.time() - started


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def table(watcher: Watcher, predicted: dict[str, float]) -> list[dict[str, object]]:
    rows = []
    for phase in PHASES:
        peak = watcher.peaks.get(phase)
        if peak is None:
            continue
        want = predicted.get(PREDICTED_AS[phase])
        rss = max(peak["VmRSS"], watcher.high.get(phase, 0)) / GIB
        rows.append({"phase": phase, "predicted_gib": None if want is None else round(want, 2),
                     "rss_gib": round(rss, 2), "sampled_gib": round(peak["VmRSS"] / GIB, 2),
                     "anon_gib": round(peak.get("RssAnon", 0) / GIB, 2),
                     "file_gib": round(peak.get("RssFile", 0) / GIB, 2),
                     "off_pct": None if not want else round(100 * (rss - want) / want, 1),
                     "seconds": round(watcher.seconds.get(phase, time.time() - watcher.started[phase]), 1)})
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    print(f"{'phase':26}{'predicted':>10}{'peak RSS':>10}{'sampled':>9}{'anon':>8}{'file':>8}{'off':>8}{'wall s':>9}")
    for row in rows:
        predicted = "-" if row["predicted_gib"] is None else f"{row['predicted_gib']:.2f}"
        off = "-" if row["off_pct"] is None else f"{row['off_pct']:+.1f}%"
        print(f"{row['phase']:26}{predicted:>10}{row['rss_gib']:>10.2f}{row['sampled_gib']:>9.2f}{row['anon_gib']:>8.2f}"
              f"{row['file_gib']:>8.2f}"
              f"{off:>8}{row['seconds']:>9.1f}")


def check_loras(output: Path, flavour, transformer_config: Path) -> list[dict[str, object]]:  # noqa: ANN001
    from trainer.fabric.lora_check import load_in_diffusers

    results = []
    for path in sorted(output.glob("*.safetensors")):
        loaded = load_in_diffusers(path, flavour, transformer_config)
        results.append({"file": path.name, "tensors": loaded.file_tensors, "adapter_tensors": loaded.adapter_tensors,
                        "ok": loaded.ok, "warnings": list(loaded.warnings)})
        verdict = "every key used" if loaded.ok else "; ".join(loaded.warnings) or "nothing loaded"
        print(f"  {path.name}: {loaded.file_tensors} tensors -> {loaded.adapter_tensors} adapter tensors in "
              f"diffusers ({verdict})")
    return results


def main(argv: list[str] | None = None) -> int:
    from trainer.fabric.make import FLAVOURS, LAYOUTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("flavour", choices=list(FLAVOURS))
    parser.add_argument("--layout", choices=list(LAYOUTS), default="hub")
    parser.add_argument("--preset", help="a preset name (default: the flavour's smallest tier)")
    parser.add_argument("--fab-dir", default="/work/fab", help="where fabricated models are kept")
    parser.add_argument("--work", help="dataset and output folder (default: FAB_DIR/rehearsals/FLAVOUR-LAYOUT)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a further job override (TOML literal), e.g. model.text_encoder_precision=int8")
    parser.add_argument("--prime-text", action="store_true",
                        help="cache the text embeddings first with the text encoders alone (bench/rehearse_prime.py), "
                             "then rehearse a repeated run: for flavours whose first run exceeds this machine's RAM")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--estimate-only", action="store_true",
                        help="print the CPU-only estimate per phase and stop (nothing fabricated or run)")
    args = parser.parse_args(argv)
    try:
        return rehearse(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def rehearse(args: argparse.Namespace) -> int:
    from trainer.estimator.auto import resolve_lowvram
    from trainer.estimator.cpu_only import cpu_only_phases, text_only_gib
    from trainer.estimator.job import estimate_job
    from trainer.fabric.make import existing, fabricate, flavour_of, needed_bytes
    from trainer.memory.system_ram import available_ram_gib

    flavour = flavour_of(args.flavour)
    fab_dir = Path(args.fab_dir)
    model = fab_dir / f"{args.flavour}-{args.layout}"
    work = Path(args.work) if args.work else fab_dir / "rehearsals" / f"{args.flavour}-{args.layout}"
    made = existing(model, flavour, args.layout, 0)
    job, spec = build_job(flavour, args.layout, model, work, args.steps, args.resolution, args.preset, args.set)
    if spec.model.text_encoder_precision == "auto":  # the session would choose by the RAM free at its start: fixed
        chosen = resolve_lowvram(spec, None, ram_gib=available_ram_gib()).text_encoder_precision  # here, as now
        print(f"model.text_encoder_precision auto: {chosen} with {available_ram_gib():.1f} GiB available", flush=True)
        job, spec = build_job(flavour, args.layout, model, work, args.steps, args.resolution, args.preset,
                              [*args.set, f'model.text_encoder_precision="{chosen}"'])
    predicted = cpu_only_phases(spec, first_run=not args.prime_text)
    if args.estimate_only:
        print(f"{flavour.label}, {args.layout}, text encoder {spec.model.text_encoder_precision}: " + ", ".join(
            f"{phase} {predicted[PREDICTED_AS[phase]]:.2f}" for phase in PHASES if PREDICTED_AS[phase] in predicted))
        return 0
    peak = max(*predicted.values(), text_only_gib(spec) if args.prime_text else 0.0)
    cache = int(estimate_job(spec, None, suggest=False).block_cache_gib * GIB)  # written beside the latents
    check_disk_and_ram(0 if made else needed_bytes(flavour, args.layout), cache, fab_dir, peak)
    if made is None:
        print(f"fabricating {flavour.label} ({args.layout}) in {model} ...", flush=True)
        made = fabricate(flavour, args.layout, model, progress=lambda line: print(line, flush=True))
    print(f"model: {made.folder} ({made.bytes / GIB:.1f} GiB, fabricated in {made.seconds:.0f} s)")
    print(f"job: {job} — preset {spec.model.flavour}: {args.preset or 'smallest tier'}; plan: "
          f"{_plan(spec)}; formats {', '.join(family_formats(flavour.family))}", flush=True)
    if (work / "output").exists():
        shutil.rmtree(work / "output")  # an earlier rehearsal's caches would make this a repeated run
    primed: list[dict[str, object]] = []
    if args.prime_text:
        _, prime, _ = run_trainer(job, work / "output" / "prime_events.jsonl", work / "prime.log",
                                  [sys.executable, str(ROOT / "bench" / "rehearse_prime.py"), str(job)])
        primed = [{**row, "phase": f"{row['phase']} (text only)"} for row in table(prime, {
            "loading": text_only_gib(spec), "caching text embeddings": text_only_gib(spec)})]
    code, watcher, seconds = run_trainer(job, work / "output" / "events.jsonl", work / "train.log")
    rows = primed + table(watcher, predicted)
    print(f"\n{flavour.label}, {args.layout} layout, CPU, {args.steps} steps at {args.resolution} px "
          f"({seconds:.0f} s, exit {code}); predicted = trainer/estimator/cpu_only.py, RSS = anon + file + shmem")
    print_table(rows)
    if watcher.steps:
        print(f"s/step: {', '.join(f'{s:.1f}' for s in watcher.steps)}")
    result = {"flavour": args.flavour, "layout": args.layout, "exit": code, "seconds": round(seconds, 1),
              "phases": rows, "steps": watcher.steps}
    if code == 0:
        print("LoRAs loaded by diffusers' load_lora_weights at real width:")
        result["loras"] = check_loras(work / "output", flavour, made.source / "transformer")
    else:
        print(f"the trainer failed; its log: {work / 'train.log'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if code == 0 and all(r["ok"] for r in result.get("loras", [])) else 1


def _plan(spec) -> str:  # noqa: ANN001
    from trainer.estimator.auto import resolve_lowvram

    return resolve_lowvram(spec, None).describe()


if __name__ == "__main__":
    sys.exit(main())
