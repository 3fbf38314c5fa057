"""Soak: a long demo run that samples and saves often must hold its memory and file handles flat.

    python bench/bench_soak.py [--steps 2000] [--every 100] [--probe 50] [--warmup 200] [--demo DIR]

One session trains the FLUX.2 demo for `--steps` steps, rendering the sample prompts and saving the LoRA and
state every `--every` steps. Every `--probe` steps (after a garbage collection, so only what is really held
counts) it reads this process's RSS and open file handles (psutil: num_fds, or num_handles on Windows).
It prints RSS at the end against RSS after `--warmup` steps (target: within 5 %) and the handle growth over
the same span (target: 0), and exits 1 when either target is missed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RSS_TARGET = 1.05


def open_handles() -> int:
    import psutil

    process = psutil.Process()
    return process.num_handles() if os.name == "nt" else process.num_fds()


def soak(demo: Path, steps: int, every: int, probe: int) -> tuple[list[tuple[int, float, int]], float]:
    """(step, RSS MiB, open handles) at step 0 and every `probe` steps; the seconds the training took."""
    import psutil

    from trainer.events import Progress
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    out = demo / "soak"
    spec = resolve_paths(load_spec(demo / "job.toml", [
        f"train.max_steps={steps}", f"sample.every_steps={every}", "sample.steps=2",
        f"output.save_every_steps={every}", "output.keep_last=2", f"output.dir='{out}'"]), demo)
    process = psutil.Process()
    readings: list[tuple[int, float, int]] = []

    def read(step: int) -> None:
        gc.collect()
        readings.append((step, process.memory_info().rss / 2**20, open_handles()))

    def emit(event: object) -> None:
        if isinstance(event, Progress) and event.step % probe == 0:
            read(event.step)

    session = Session(spec, emit=emit)
    try:
        session.setup()
        read(0)
        started = time.perf_counter()
        session.train()
        session.save()
        seconds = time.perf_counter() - started
    finally:
        session.end()
    return readings, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="sample and save every N steps")
    parser.add_argument("--probe", type=int, default=50, help="read RSS and handles every N steps")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the RSS baseline")
    parser.add_argument("--demo", type=Path, help="an existing demo folder (default: build one in a temp folder)")
    args = parser.parse_args()

    from trainer.quiet import silence_library_noise

    silence_library_noise()
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        demo = args.demo or Path(scratch)
        if args.demo is None:
            from trainer.demo import build_demo

            build_demo(demo)
        readings, seconds = soak(demo, args.steps, args.every, args.probe)

    print(f"{'step':>6} {'RSS MiB':>9} {'handles':>8}")
    for step, rss, handles in readings:
        print(f"{step:>6} {rss:>9.1f} {handles:>8}")
    base = next(r for r in readings if r[0] >= args.warmup)
    last = readings[-1]
    rss_ratio, handle_growth = last[1] / base[1], last[2] - base[2]
    print(f"\n{args.steps} steps, sampling and saving every {args.every}: {seconds:.0f} s "
          f"({seconds / args.steps * 1000:.1f} ms/step, samples, saves and probes included)")
    print(f"RSS end / after warm-up (step {base[0]}): {last[1]:.1f} / {base[1]:.1f} MiB = {rss_ratio:.3f} "
          f"(target ≤ {RSS_TARGET}); peak {max(r[1] for r in readings):.1f} MiB")
    print(f"open handles: {base[2]} after warm-up, {last[2]} at the end: growth {handle_growth} (target 0)")
    ok = rss_ratio <= RSS_TARGET and handle_growth <= 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
