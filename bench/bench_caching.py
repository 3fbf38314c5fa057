"""Latent caching throughput against a bare VAE-encode loop, and time to the first step with a warm cache.

    python bench/bench_caching.py [--images 48] [--size 256]

Builds the FLUX.2 demo with a dataset of `--images` generated pictures, then in this process:
1. bare: load each image, resize and crop, VAE-encode, patchify and normalise — images per second;
2. ours: the session's latent caching to disk (content hashing, atomic safetensors writes) — images per second;
3. start to first training step of a cold run and of a second run on the warm cache (no text encoder loaded).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.quiet import silence_library_noise  # noqa: E402

silence_library_noise()


def bare_encode(demo: Path, images: list[Path], size: int) -> float:
    import torch

    from trainer import registry
    from trainer.data.images import load_pixels
    from trainer.families import flux2

    pipe = flux2.load_pipeline(str(demo / "flux2"), registry.get_flavour("flux2", "demo"), torch.float32)
    start = time.perf_counter()
    for path in images:
        flux2.encode_images(pipe, load_pixels(path, size)[None])
    return len(images) / (time.perf_counter() - start)


def session_times(demo: Path, dataset: Path, size: int, cache: Path, out: Path) -> tuple[float, float]:
    """(seconds from Session() to the end of the first step, images per second while caching latents)."""
    from trainer.events import PhaseChanged
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    spec = resolve_paths(load_spec(demo / "job.toml", [
        "train.max_steps=1", "sample.prompts=[]", f"data.resolution={size}", f"data.datasets[0].path='{dataset}'",
        "data.cache_latents='disk'", "data.cache_text_embeddings='disk'", f"data.cache_dir='{cache}'",
        f"output.dir='{out}'", "output.save_state=false"]), demo)
    marks: dict[str, float] = {}

    def emit(event: object) -> None:
        if isinstance(event, PhaseChanged) and event.phase not in marks:
            marks[event.phase] = time.perf_counter()

    start = time.perf_counter()
    session = Session(spec, emit=emit)
    session.setup()
    session.train(1)
    first_step = time.perf_counter() - start
    images = len(session.items)
    session.end()
    caching = marks["training"] - marks["caching latents"]
    return first_step, images / caching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    from trainer.demo import build_demo, build_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp)
        build_demo(demo, ("flux2",))
        dataset = build_demo_dataset(demo / "big", count=args.images, size=args.size)
        images = sorted(dataset.glob("*.png"))
        bare = bare_encode(demo, images, args.size)
        cold, ours = session_times(demo, dataset, args.size, demo / "cache", demo / "out1")
        warm, _ = session_times(demo, dataset, args.size, demo / "cache", demo / "out2")
    print(f"FLUX.2 demo VAE, {args.images} images at {args.size} px, CPU")
    print(f"latent caching, images/s : bare {bare:8.1f}   ours {ours:8.1f}   ratio ours/bare {ours / bare:6.3f}")
    print(f"start to first step, s   : cold {cold:8.2f}   warm {warm:8.2f}   ratio warm/cold {warm / cold:6.3f}")


if __name__ == "__main__":
    main()
