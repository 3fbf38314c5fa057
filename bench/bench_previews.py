"""sample.preview_every: sampling time with live previews on against off, in the same process, interleaved.

    python bench/bench_previews.py [--steps 10] [--every 5] [--resolution 256] [--repeats 3] [--threads N]
                                   [--skip-real]

Two models, each sampled through the session's own path (the family's `sample` with the `LivePreviews` callback:
the denoised estimate, the VAE decode on a downscaled latent, the JPEG written atomically, the file removed when
the sample ends):

- the demo (tiny random FLUX.2 [klein]-shaped pipeline, 64 px);
- a real-width, shallow FLUX.2 [klein] base 4B (width 3072, 24 heads of 128, joint dim 7680, one double and one
  single block, random weights) with the real-size FLUX.2 VAE (84 M parameters, random) and classifier-free
  guidance as klein base samples, at --resolution.

Prints the median seconds per sample of each side and their ratio, the denoising step and one preview's cost
(timed by itself: on a loaded machine the difference of two whole samples is noisy), and the steady-state
overhead of a preview every --every steps (1 + preview / (every x step): the ratio over a long sample, the final
decode aside). A shallow model's step is a fraction of the real one's while its VAE is
whole, so the overhead measured there overstates the cost; the last line projects it at the full 5 + 20 blocks,
scaling the step by the blocks' parameter counts (matrix products over the same tokens in every block).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _demo_pipe(folder: Path) -> tuple[object, dict, dict | None, float]:
    import torch

    from trainer.demo import build_flux2_demo
    from trainer.families import flux2
    from trainer.registry import get_flavour

    flavour = get_flavour("flux2", "demo")
    source = str(build_flux2_demo(folder))
    pipe = flux2.load_pipeline(source, flavour, torch.float32, skip=("text_encoder", "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    text = {"prompt_embeds": torch.randn(1, 16, pipe.transformer.config.joint_attention_dim, generator=generator)}
    return pipe, text, None, flavour.sample_guidance


def _real_width_pipe() -> tuple[object, dict, dict | None, float]:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    from trainer.fabric.models import scheduler_config
    from trainer.registry import get_flavour

    flavour = get_flavour("flux2", "klein-base-4b")
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=flavour.num_heads, joint_attention_dim=flavour.joint_attention_dim,
        timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False).eval()
    vae = AutoencoderKLFlux2().eval()  # the released VAE's shapes
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(flavour)),
                              vae=vae, text_encoder=None, tokenizer=None, transformer=transformer, is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    text = {"prompt_embeds": torch.randn(1, 32, flavour.joint_attention_dim, generator=generator)}
    negative = {"prompt_embeds": torch.randn(1, 32, flavour.joint_attention_dim, generator=generator)}
    return pipe, text, negative, flavour.sample_guidance


def _sample_seconds(pipe: object, text: dict, negative: dict | None, guidance: float, args: argparse.Namespace,
                    every: int, resolution: int, folder: Path) -> tuple[float, int]:
    """One sample's wall time through the session's path; with `every`, its previews on; and how many there were."""
    import torch

    from trainer.families import flux2
    from trainer.previews import LivePreviews
    from trainer.prompts import SamplePrompt

    shown: list[object] = []
    live = LivePreviews(flux2, pipe, pipe.vae, folder / "previews", shown.append, every, args.steps, 0, 1) \
        if every else None
    prompt = SamplePrompt("0", "bench")
    started = time.perf_counter()
    with torch.no_grad():
        flux2.sample(pipe, text, negative, args.steps, guidance, 42, resolution, None,
                     live.watch(0, prompt, resolution, resolution) if live else None)
    if live:
        live.done(0)
    return time.perf_counter() - started, len(shown)


def _compare(name: str, pipe: object, text: dict, negative: dict | None, guidance: float,
             args: argparse.Namespace, resolution: int, folder: Path) -> tuple[float, float]:
    """Prints the measured sides and ratio; returns (seconds per denoising step, seconds per preview)."""
    _sample_seconds(pipe, text, negative, guidance, args, args.every, resolution, folder)  # warm-up: both paths
    off, on, count = [], [], 0
    for _ in range(args.repeats):  # interleaved: the machine's load falls on both sides alike
        off.append(_sample_seconds(pipe, text, negative, guidance, args, 0, resolution, folder)[0])
        seconds, count = _sample_seconds(pipe, text, negative, guidance, args, args.every, resolution, folder)
        on.append(seconds)
    bare, with_previews = statistics.median(off), statistics.median(on)
    step = (bare - _decode_seconds(pipe, resolution, args.repeats)) / args.steps
    each = _preview_seconds(pipe, resolution, args.repeats, folder)
    print(f"{name}: {args.steps} steps at {resolution} px, {count} previews (every {args.every}): "
          f"off {bare:.3f} s/sample, on {with_previews:.3f} s/sample, ratio on/off {with_previews / bare:.3f}; "
          f"{step * 1000:.0f} ms per denoising step; one preview alone {each * 1000:.0f} ms (from the samples: "
          f"{(with_previews - bare) / max(count, 1) * 1000:.0f} ms)")
    return step, each


def _preview_seconds(pipe: object, resolution: int, repeats: int, folder: Path) -> float:
    """One preview by itself (median): the latents turned for the decoder, downscaled, decoded, written as JPEG.
    Steadier than the difference of two whole samples on a loaded machine."""
    import torch

    from trainer.families import flux2
    from trainer.previews import LivePreviews
    from trainer.prompts import SamplePrompt

    live = LivePreviews(flux2, pipe, pipe.vae, folder / "previews", lambda event: None, 1, 2, 0, 1)
    side = resolution // (pipe.vae_scale_factor * 2)
    estimate = torch.randn(1, side * side, pipe.transformer.config.in_channels)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        live._show(0, SamplePrompt("0", "bench"), resolution, resolution, 1, estimate)
        times.append(time.perf_counter() - started)
    live.done(0)
    return statistics.median(times)


def _decode_seconds(pipe: object, resolution: int, repeats: int) -> float:
    """The final image's VAE decode alone (median): the part of a sample that is not denoising."""
    import torch

    side = resolution // pipe.vae_scale_factor
    latents = torch.randn(1, pipe.vae.config.latent_channels, side, side)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            pipe.vae.decode(latents, return_dict=False)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _steady(name: str, step: float, each: float, every: int) -> None:
    """Denoising with a preview every `every` steps, the final decode aside: 1 + preview / (every x step)."""
    print(f"{name}: a preview every {every} steps costs {100 * each / (every * step):.1f} % of the denoising "
          f"(ratio {1 + each / (every * step):.3f})")


def _full_depth_step(pipe: object, step: float) -> tuple[float, str]:
    """klein base 4B's denoising step at its full 5 + 20 blocks: the shallow step scaled by the blocks' parameters
    (the step is matrix products over the same tokens in every block)."""
    from trainer.registry import get_flavour

    flavour = get_flavour("flux2", "klein-base-4b")
    model = pipe.transformer
    double = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    single = sum(p.numel() for p in model.single_transformer_blocks[0].parameters())
    depth = (flavour.double_blocks * double + flavour.single_blocks * single) / (double + single)
    blocks = f"{flavour.double_blocks} + {flavour.single_blocks} blocks"
    return step * depth, f"klein base 4B projected at full depth ({blocks}, step x{depth:.1f})"


def torch_threads_default() -> int:
    """The machine's cores: the real-width model's products use them; on a shared machine pass fewer."""
    return os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=5)  # sample.preview_every's default
    parser.add_argument("--resolution", type=int, default=256, help="of the real-width model's samples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-real", action="store_true", help="the demo only")
    parser.add_argument("--threads", type=int, default=torch_threads_default(), help="for the real-width model")
    args = parser.parse_args()
    from trainer.quiet import silence_library_noise

    silence_library_noise()
    import torch

    from trainer.quiet import disable_loading_bars

    disable_loading_bars()

    print(f"torch {torch.__version__}, {args.threads} threads for the real-width model, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipe, text, negative, guidance = _demo_pipe(folder)
        torch.set_num_threads(1)  # the demo's tiny products run fastest on one thread (as in the tests)
        step, each = _compare("demo", pipe, text, negative, guidance, args, 64, folder)
        _steady("demo", step, each, args.every)
        torch.set_num_threads(args.threads)
        if not args.skip_real:
            pipe, text, negative, guidance = _real_width_pipe()
            name = "real-width klein base 4B (1 + 1 blocks, CFG), real VAE"
            step, each = _compare(name, pipe, text, negative, guidance, args, args.resolution, folder)
            _steady(name, step, each, args.every)
            full, how = _full_depth_step(pipe, step)
            _steady(how, full, each, args.every)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
