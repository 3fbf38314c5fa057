"""Steps per second and peak RSS of our session against a bare diffusers + peft loop on the same demo model.

    python bench/bench_train_step.py [--steps 60] [--family flux2]

Each side runs in its own child process (so each peak RSS is its own) on the same machine, alternating
for `--rounds` rounds; the parent prints the median of each side and the ratios. The bare loop does the
minimum any trainer must: the same transformer with the same peft LoRA, cached inputs, flow-matching loss,
AdamW — nothing of ours.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOBS = {"flux2": "job.toml", "flux1": "job_flux1.toml"}


def _spec(demo: Path, family: str, steps: int):  # noqa: ANN202
    from trainer.spec import load_spec, resolve_paths

    overrides = [f"train.max_steps={steps}", "sample.prompts=[]", "output.save_state=false",
                 f"output.dir='{demo / 'out'}'"]
    return resolve_paths(load_spec(demo / JOBS[family], overrides), demo)


def session_step_times(demo: Path, family: str, steps: int) -> list[float]:
    from trainer.session import Session

    stamps: list[float] = []
    session = Session(_spec(demo, family, steps),
                      emit=lambda event: stamps.append(time.perf_counter()) if event.kind == "progress" else None)
    session.setup()
    session.train()
    session.end()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def bare_step_times(demo: Path, family: str, steps: int) -> list[float]:
    import diffusers
    import torch
    from peft import LoraConfig

    from trainer import registry
    from trainer.adapters import target_modules
    from trainer.data.datasets import collect_items
    from trainer.data.images import load_pixels
    from trainer.families import family_ops

    spec = _spec(demo, family, steps)
    flavour = registry.get_flavour(family, "demo")
    ops = family_ops(family)
    pipe = getattr(diffusers, flavour.pipeline_class).from_pretrained(demo / family, dtype=torch.float32)
    items = collect_items(spec)[: spec.train.batch_size]
    latents = torch.cat([ops.encode_images(pipe, load_pixels(i.image_path, i.resolution)[None]) for i in items])
    text = ops.encode_prompts(pipe, [i.caption for i in items], flavour)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha,
                                       target_modules=target_modules(transformer, family, "all")))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.train.learning_rate)
    guidance = torch.ones(latents.shape[0]) if flavour.guidance == "embedded" else None
    times: list[float] = []
    for _ in range(steps):
        start = time.perf_counter()
        sigmas = torch.rand(latents.shape[0])
        noise = torch.randn_like(latents)
        s = sigmas.view(-1, 1, 1, 1)
        loss = ((ops.predict(transformer, (1 - s) * latents + s * noise, sigmas, text, guidance)
                 - (noise - latents)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def child(mode: str, demo: Path, family: str, steps: int) -> None:
    from trainer.quiet import silence_library_noise

    silence_library_noise()
    times = (session_step_times if mode == "session" else bare_step_times)(demo, family, steps)
    warm = len(times) // 5  # the first steps include allocator and kernel warm-up
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"median_step_s": statistics.median(times[warm:]), "peak_rss_mib": peak_kib / 1024}))


def measure(mode: str, demo: Path, family: str, steps: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--child", mode, "--demo", str(demo), "--family", family,
                             "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--family", choices=sorted(JOBS), default="flux2")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side (noise on a busy CPU)")
    parser.add_argument("--child", choices=["session", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--demo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.demo, args.family, args.steps)
        return
    from trainer.demo import build_demo
    from trainer.quiet import silence_library_noise

    silence_library_noise()
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp)
        build_demo(demo, (args.family,))
        runs: dict[str, list[dict[str, float]]] = {"bare": [], "session": []}
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(measure(mode, demo, args.family, args.steps))
    bare, ours = ({key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]}
                  for mode in ("bare", "session"))
    print(f"demo {args.family}, {args.steps} steps x {args.rounds} rounds, batch 2 at 64 px, CPU")
    print(f"{'':24}{'bare':>12}{'session':>12}{'ratio':>10}")
    print(f"{'steps per second':24}{1 / bare['median_step_s']:12.2f}{1 / ours['median_step_s']:12.2f}"
          f"{bare['median_step_s'] / ours['median_step_s']:10.3f}   (session / bare; target >= 0.9)")
    print(f"{'peak RSS (MiB)':24}{bare['peak_rss_mib']:12.0f}{ours['peak_rss_mib']:12.0f}"
          f"{ours['peak_rss_mib'] / bare['peak_rss_mib']:10.3f}   (session / bare)")


if __name__ == "__main__":
    main()
