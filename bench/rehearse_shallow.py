"""A rehearsal at real widths and reduced depth: what bench/rehearse.py does, on a model a few blocks deep.

    nice .venv/bin/python bench/rehearse_shallow.py klein-base-9b --double 2 --single 3 --swap 3

The flavour's transformer keeps its real widths (hidden size, heads, MLP) with `--double` double and `--single`
single blocks and small text encoders (trainer/fabric/make.py real_width), fabricated in the hub layout under
--work; the job is the flavour's smallest-tier preset as bench/rehearse.py builds it. The trainer and the
estimator both see the shallow flavour under the real flavour's name, so the table compares like with like.
Running two depths separates what the estimate misses per block from what it misses once: a few GiB of RAM and
minutes, where the full-depth rehearsal takes 32 GiB of disk and an hour.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shallow(name: str, double: int, single: int):  # noqa: ANN201 - a registry.Flavour
    """The flavour `name` at real widths, `double` + `single` blocks deep, registered under its own name."""
    from trainer import registry
    from trainer.fabric.make import flavour_of, real_width

    real = flavour_of(name)
    flavour = replace(real_width(real), double_blocks=double, single_blocks=single,
                      max_blocks_to_swap=registry._DERIVE)  # the block counts changed: derive it again
    registry.FAMILIES[flavour.family].flavours[flavour.name] = flavour
    return flavour


def child(argv: list[str]) -> int:
    """The trainer's own CLI with the shallow flavour registered: `child NAME DOUBLE SINGLE train JOB ...`."""
    shallow(argv[0], int(argv[1]), int(argv[2]))
    from trainer.__main__ import main

    return main(argv[3:])


def main(argv: list[str] | None = None) -> int:
    from bench.rehearse import print_table, run_trainer, table
    from bench.rehearse_job import build_job
    from trainer.estimator.cpu_only import cpu_only_phases
    from trainer.fabric.make import existing, fabricate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("flavour")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--preset")
    parser.add_argument("--work", default="/tmp/rehearse-shallow")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--swap", type=int, required=True, help="lowvram.blocks_to_swap (at most the depth - 2)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    flavour = shallow(args.flavour, args.double, args.single)
    work = Path(args.work) / f"{args.flavour}-{args.double}d{args.single}s"
    model = work / "model"
    made = existing(model, flavour, "hub", 0) or fabricate(flavour, "hub", model, small_encoders=True)
    job, spec = build_job(flavour, "hub", model, work, args.steps, args.resolution, args.preset,
                          ['model.text_encoder_precision="int8"', *args.set],
                          lowvram={"blocks_to_swap": args.swap})
    predicted = cpu_only_phases(spec)
    if (work / "output").exists():
        shutil.rmtree(work / "output")
    command = [sys.executable, __file__, "--child", args.flavour, str(args.double), str(args.single),
               "train", str(job), "--no-progress", "--force"]
    code, watcher, seconds = run_trainer(job, work / "output" / "events.jsonl", work / "train.log", command,
                                       console=True)
    watcher_log = work / "train.log"
    rows = table(watcher, predicted)
    print(f"{flavour.label} at real widths, {args.double} double + {args.single} single blocks "
          f"({made.bytes / 1024**3:.2f} GiB), {args.steps} steps at {args.resolution} px "
          f"({seconds:.0f} s, exit {code})")
    print_table(rows)
    if watcher.steps:
        print(f"s/step: {', '.join(f'{s:.1f}' for s in watcher.steps)}")
    if code:
        print(f"the trainer failed; its log: {watcher_log}")
    if args.json:
        Path(args.json).write_text(json.dumps({"phases": rows, "steps": watcher.steps, "exit": code}, indent=2),
                                   encoding="utf-8")
    return code


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
