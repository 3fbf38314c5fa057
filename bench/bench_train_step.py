"""Time per training step of our session against a bare peft + AdamW loop on the same demo model.

    python bench/bench_train_step.py [--steps 60] [--family flux2]

Both run in this process on the same machine; the ratio is our session's overhead (data order, timestep
sampling, loss weighting, events) over the minimum any trainer must do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.quiet import silence_library_noise  # noqa: E402

silence_library_noise()

import torch  # noqa: E402

from trainer.demo import build_demo  # noqa: E402
from trainer.session import Session  # noqa: E402
from trainer.spec import load_spec, resolve_paths  # noqa: E402

JOBS = {"flux2": "job.toml", "flux1": "job_flux1.toml"}


def session_step_times(demo: Path, family: str, steps: int) -> list[float]:
    spec = resolve_paths(load_spec(demo / JOBS[family], [f"train.max_steps={steps}", "sample.prompts=[]"]), demo)
    stamps: list[float] = []
    session = Session(spec, emit=lambda event: stamps.append(time.perf_counter()) if event.kind == "progress" else None)
    session.setup()
    session.train()
    session.end()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def bare_step_times(demo: Path, family: str, steps: int) -> list[float]:
    """The same work with nothing of ours: cached inputs drawn at random, peft LoRA, AdamW."""
    spec = resolve_paths(load_spec(demo / JOBS[family], ["train.max_steps=1", "sample.prompts=[]"]), demo)
    session = Session(spec)
    session.setup()  # reuse our loading and caching only to get identical tensors and adapter
    transformer, ops, text_cache = session.transformer, session.ops, session.text_cache
    latents = torch.cat(session.latents[: spec.train.batch_size])
    text = text_cache.batch([item.caption for item in session.items[: spec.train.batch_size]], torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4)
    guidance = torch.ones(latents.shape[0]) if session.flavour.guidance == "embedded" else None
    times: list[float] = []
    for _ in range(steps):
        start = time.perf_counter()
        sigmas = torch.rand(latents.shape[0])
        noise = torch.randn_like(latents)
        noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        loss = ((ops.predict(transformer, noisy, sigmas, text, guidance) - (noise - latents)) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    session.end()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--family", choices=sorted(JOBS), default="flux2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp)
        build_demo(demo, (args.family,))
        warm = args.steps // 5  # the first steps include allocator and kernel warm-up
        ours = statistics.median(session_step_times(demo, args.family, args.steps)[warm:])
        bare = statistics.median(bare_step_times(demo, args.family, args.steps)[warm:])
    print(f"family {args.family}, {args.steps} steps, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"bare peft+AdamW step : {bare * 1000:8.2f} ms (median)")
    print(f"session step         : {ours * 1000:8.2f} ms (median)")
    print(f"ratio session / bare : {ours / bare:8.3f}")


if __name__ == "__main__":
    main()
