"""train.compile: training steps per second with every block compiled (torch.compile, inductor) against eager.

    python bench/bench_compile.py [--resolution 128] [--steps 6] [--heads 32] [--text-tokens 32]

A real-width, shallow FLUX.2 transformer (klein-base-9B's width: 32 heads of 128, joint dim 12288; one double
and one single block) with random weights and a rank-16 LoRA on every block Linear, trained with AdamW on random
latents. The reference is the same model eager in the same process, first. Prints the compile time (the first
compiled step minus a warm eager step), the median s/step of each side and the ratio. On the CPU torch.compile
uses inductor's C++ backend; on a GPU, Triton. Each side is built the session's way (trainer/compiled_blocks.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model(heads: int, joint_dim: int, device: str, dtype: object) -> object:
    import torch
    from diffusers import Flux2Transformer2DModel

    from trainer.adapters import add_adapter

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                    attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=joint_dim,
                                    timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32),
                                    guidance_embeds=False).to(device, dtype)
    model.requires_grad_(False)
    add_adapter(model, "flux2", type="lora", rank=16, alpha=16, dropout=0.0, targets="all", init="gaussian",
                init_from="", base_precision="bf16")
    return model


def step_times(compiled: bool, args: argparse.Namespace) -> list[float]:
    import torch

    from trainer.compiled_blocks import CompiledBlocks
    from trainer.families import flux2
    from trainer.tread import transformer_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _model(args.heads, args.joint_dim, device, dtype)
    if compiled:
        CompiledBlocks(transformer_blocks(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = args.resolution // 16
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 128, side, side, generator=generator).to(device)
    text = {"prompt_embeds": torch.randn(1, args.text_tokens, args.joint_dim, generator=generator).to(device)}
    times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            prediction = flux2.predict(model, latents, torch.full((1,), 0.5, device=device), text, None)
        (prediction.float() - latents).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--heads", type=int, default=32)  # 32 x 128 = 4096, klein-base-9B's width
    parser.add_argument("--joint-dim", type=int, default=12288)
    parser.add_argument("--text-tokens", type=int, default=32)
    args = parser.parse_args()
    import torch

    eager = step_times(False, args)
    compiled = step_times(True, args)
    e, c = statistics.median(eager[1:]), statistics.median(compiled[1:])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; width {args.heads * 128}, 1 double + 1 single block, {args.resolution} px, "
          f"{args.text_tokens} text tokens, {args.steps} steps after the first")
    print(f"eager:    {e:8.3f} s/step ({1 / e:.3f} steps/s)")
    print(f"compiled: {c:8.3f} s/step ({1 / c:.3f} steps/s)")
    print(f"compile time (first compiled step - an eager step): {compiled[0] - e:.1f} s")
    print(f"ratio compiled/eager steps per second: {e / c:.3f}")


if __name__ == "__main__":
    main()
