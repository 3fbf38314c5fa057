"""The cost of lowvram.empty_cache_every: median step time with the cache released every step against never.

    python bench/bench_empty_cache.py [--steps 40] [--rounds 3] [--every 1] [--demo DIR]

Both sides train the demo job in this process, alternating for `--rounds` rounds; the first steps of each run
are dropped (warm-up). On a GPU the released side re-allocates its blocks each step; on the CPU the release is
a no-op, so the ratio measures only the bookkeeping.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 3


def step_seconds(demo: Path, steps: int, every: int | None) -> list[float]:
    from trainer.events import Progress
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    overrides = [f"train.max_steps={steps}", "sample.prompts=[]", "output.save_state=false",
                 f"output.dir='{demo / 'out_empty_cache'}'"]
    if every:
        overrides.append(f"lowvram.empty_cache_every={every}")
    times: list[float] = []
    session = Session(resolve_paths(load_spec(demo / "job.toml", overrides), demo),
                      emit=lambda e: times.append(e.step_seconds) if isinstance(e, Progress) else None)
    try:
        session.setup()
        session.train()
    finally:
        session.end()
    return times[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--demo", type=Path, default=None, help="a built demo folder (default: build one)")
    args = parser.parse_args()
    import torch

    from trainer.demo import build_demo

    demo = args.demo or Path(tempfile.mkdtemp(prefix="bench_empty_cache_")) / "demo"
    if args.demo is None:
        build_demo(demo)
    never: list[float] = []
    released: list[float] = []
    for _ in range(args.rounds):
        never += step_seconds(demo, args.steps, None)
        released += step_seconds(demo, args.steps, args.every)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    a, b = statistics.median(never), statistics.median(released)
    print(f"device: {device}; demo job, {args.rounds} rounds x {args.steps} steps (first {WARMUP} dropped)")
    print(f"never released:            {a * 1000:8.2f} ms/step (median)")
    print(f"released every {args.every:>3} steps: {b * 1000:8.2f} ms/step (median)")
    print(f"ratio released/never: {b / a:.3f}")


if __name__ == "__main__":
    main()
