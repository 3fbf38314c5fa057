"""Resident heap while a text encoder computes on the CPU: placed as the trainer places it (its heap trimmed after
each layer) against the same placement without the trim, each in a fresh process.

A job's text encoder is loaded as the session loads it (the pipeline without its transformer), placed with
TextEncoderPlacement on the CPU in the job's mode, and encodes the job's captions once. Printed per process, at
the load, the placement and every fourth layer: RSS, the heap's resident pages ([heap] in /proc/self/smaps) and
what glibc holds in use there (mallinfo2); then the peak RSS (VmHWM) and peak / reference. Point it at a rehearsal's
job on a fabricated model (bench/rehearse.py writes /work/fab/rehearsals/NAME/job.toml):

    flock /tmp/bigrun.lock nice .venv/bin/python bench/bench_text_encoder_heap.py \\
        /work/fab/rehearsals/klein-base-9b-comfy/job.toml
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _heap_resident() -> int:
    resident, current = 0, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0]:
                current = parts[5] if len(parts) > 5 else ""
            elif parts[0] == "Rss:" and current == "[heap]":
                resident += int(parts[1]) * 1024
    return resident


def _report(what: str) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    in_use = libc.mallinfo2().uordblks
    print(f"  {what:16s} RSS {_status('VmRSS') / GIB:5.2f}  heap resident {_heap_resident() / GIB:5.2f}"
          f"  heap in use {in_use / GIB:5.2f}", flush=True)


def child(job: str, trim: bool) -> None:
    import torch

    import trainer.memory.placement as placement
    from trainer import registry
    from trainer.__main__ import _load_job
    from trainer.data.health import check_datasets
    from trainer.data.planning import plan_training_items
    from trainer.estimator.auto import resolve_lowvram
    from trainer.families import family_ops
    from trainer.memory.system_ram import available_ram_gib
    from trainer.preflight import model_source
    from trainer.prompts import sample_prompts
    from trainer.quiet import disable_loading_bars, silence_library_noise
    from trainer.sources import model_files

    silence_library_noise()
    disable_loading_bars()
    spec = _load_job(job, [])
    plan = resolve_lowvram(spec, None, ram_gib=available_ram_gib())
    flavour, ops = registry.get_flavour(spec.model.family, spec.model.flavour), family_ops(spec.model.family)
    items, _ = plan_training_items(spec, check_datasets(spec))
    captions = list(dict.fromkeys([i.caption for i in items] + [""] + [p.text for p in sample_prompts(spec)]))
    pipe = ops.load_pipeline(model_source(spec), flavour, torch.bfloat16, skip=("transformer",),
                             files=model_files(spec.model), base_precision=spec.model.base_precision,
                             text_encoder_precision=plan.text_encoder_precision)
    _report("loaded")
    if not trim:  # the reference: the same placement, its layers' hooks doing nothing
        placement.release_freed_heap = lambda: False
    placed = placement.TextEncoderPlacement(pipe, torch.device("cpu"), plan.text_encoder_device)
    _report(f"placed ({plan.text_encoder_device})")
    layers = placement.decoder_layers(pipe.text_encoder)
    for index, layer in enumerate(layers):
        if index % 4 == 0 or index == len(layers) - 1:
            layer.register_forward_hook(lambda *_, index=index: _report(f"after layer {index}"))
    start = time.perf_counter()
    ops.encode_prompts(pipe, captions, flavour)
    _report(f"encoded ({time.perf_counter() - start:.0f} s)")
    placed.release()
    print(f"PEAK {_status('VmHWM') / GIB:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", help="a job.toml whose model is real-size (a rehearsal's)")
    parser.add_argument("--child", choices=("trim", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.job, args.child == "trim")
        return 0
    peaks = {}
    for run in ("reference", "trim"):
        print(f"{run}:", flush=True)
        done = subprocess.run([sys.executable, __file__, args.job, "--child", run], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        lines = done.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("PEAK")), flush=True)
        peak = [float(line.split()[1]) for line in lines if line.startswith("PEAK")]
        if done.returncode or not peak:
            print(f"{run} failed (exit {done.returncode})")
            return 1
        peaks[run] = peak[0]
    print(f"peak RSS: trimmed after each layer {peaks['trim']:.2f} GiB, reference {peaks['reference']:.2f} GiB, "
          f"ratio {peaks['trim'] / peaks['reference']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
