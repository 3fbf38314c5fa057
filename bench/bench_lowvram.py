"""Peak VRAM and seconds per step of each low-VRAM strategy, on a klein-9B-shaped transformer with random weights.

    python bench/bench_lowvram.py [--resolutions 512 1024] [--steps 6] [--precision bf16] [--vram-gib 8]
    python bench/bench_lowvram.py --tiny      # the demo-sized shape on the CPU: checks the code path only

Each case runs in its own child process (a clean allocator, its own peak): the transformer is built from
Flux2Transformer2DModel with klein-base-9B's shape (8 double + 24 single blocks, hidden 4096, joint dim 12288),
a rank-16 LoRA on every block Linear, and the session's own pieces run the plan: checkpointing, block swap,
activation offload, fused / offloaded optimiser. Inputs are random latents and text embeddings (512 text
tokens). The reference is the same machine in the same run: strategy `none` for s/it, and for the swap cost
`conservative` (checkpointing, nothing swapped) against `conservative` with half the swappable blocks swapped.
`--vram-gib` caps the process with torch.cuda.set_per_process_memory_fraction to emulate a smaller card
(an out-of-memory case prints "OOM").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KLEIN_9B = dict(num_layers=8, num_single_layers=24, attention_head_dim=128, num_attention_heads=32,
                joint_attention_dim=12288, text_tokens=512)
TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=48, text_tokens=16)


def _transformer(shape: dict, device: str, dtype: object) -> object:
    """Random weights without a full-precision copy: built on the meta device, then filled in place."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=shape["num_layers"],
            num_single_layers=shape["num_single_layers"], attention_head_dim=shape["attention_head_dim"],
            num_attention_heads=shape["num_attention_heads"], joint_attention_dim=shape["joint_attention_dim"],
            timestep_guidance_channels=256 if shape is KLEIN_9B else 32,
            axes_dims_rope=(32, 32, 32, 32) if shape is KLEIN_9B else (4, 4, 4, 4), guidance_embeds=False)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)
            param.normal_(0.0, 0.02, generator=generator)
    return model


def run_case(shape: dict, strategy: str, resolution: int, steps: int, blocks_to_swap: int | None = None,
             device_name: str | None = None) -> dict:
    """One strategy at one resolution: peak VRAM (GiB) and seconds per optimiser step after a warm-up step."""
    import torch

    from trainer.adapters import add_adapter
    from trainer.families import flux2
    from trainer.memory.checkpointing import ActivationOffloader, enable_block_checkpointing
    from trainer.memory.optimizer_memory import FusedBackward, build_training_optimizer
    from trainer.memory.placement import place_transformer
    from trainer.memory.strategies import bundle_plan
    from trainer.spec import parse_spec
    from trainer.tread import transformer_blocks

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    flavour = "klein-base-9b" if shape is KLEIN_9B else "demo"
    spec = parse_spec({"model": {"family": "flux2", "flavour": flavour, "source": "x"}})
    plan = bundle_plan(spec, strategy, blocks_to_swap)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = _transformer(shape, "cpu", dtype)
    transformer.requires_grad_(False)
    add_adapter(transformer, "flux2", type="lora", rank=16, alpha=16, dropout=0.0, targets="all", init="default",
                init_from="", base_precision="bf16")
    blocks = transformer_blocks(transformer)
    offloader = ActivationOffloader(device, plan.pin_memory) if plan.cpu_offload_checkpointing else None
    if plan.gradient_checkpointing:
        enable_block_checkpointing(transformer, blocks, plan.checkpointing_interval, range(plan.blocks_to_swap),
                                   offloader)
    swapper = place_transformer(transformer, blocks, device, plan.blocks_to_swap, plan.swap_prefetch,
                                plan.pin_memory)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer, scheduler = build_training_optimizer(
        params, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=ps[0].device.type == "cuda"),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), offload=plan.optimizer_offload,
        fused_backward=plan.fused_backward, max_grad_norm=1.0, pin_memory=plan.pin_memory)
    side = resolution // 16
    latents = torch.randn(1, 128, side, side, device=device)
    text = {"prompt_embeds": torch.randn(1, shape["text_tokens"], shape["joint_attention_dim"], device=device)}
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 1):
        started = time.perf_counter()
        if isinstance(optimizer, FusedBackward):
            optimizer.stepping = True
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prediction = flux2.predict(transformer, latents, torch.rand(1, device=device), text, None)
        loss = (prediction.float() - latents).pow(2).mean()
        loss.backward()
        if not isinstance(optimizer, FusedBackward):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    copied = swapper.stats.bytes_copied / 2**30 / (steps + 1) if swapper is not None else 0.0
    return {"strategy": strategy, "resolution": resolution, "blocks_to_swap": plan.blocks_to_swap,
            "s_per_step": sorted(times[1:])[len(times[1:]) // 2], "peak_vram_gib": peak,
            "swap_gib_per_step": copied, "plan": plan.describe()}


def _child(args: argparse.Namespace, strategy: str, resolution: int, swap: int | None) -> dict:
    command = [sys.executable, __file__, "--case", json.dumps([strategy, resolution, swap]),
               "--steps", str(args.steps)] + (["--tiny"] if args.tiny else []) + (
        ["--vram-gib", str(args.vram_gib)] if args.vram_gib else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        oom = "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr
        return {"strategy": strategy, "resolution": resolution, "blocks_to_swap": swap, "error":
                "OOM" if oom else done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="demo-sized shape (for a CPU check of the code path)")
    parser.add_argument("--vram-gib", type=float, default=None, help="emulate a card of this size")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = TINY if args.tiny else KLEIN_9B
    if args.case:
        import torch

        if args.vram_gib and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_gib / total))
        strategy, resolution, swap = json.loads(args.case)
        print(json.dumps(run_case(shape, strategy, resolution, args.steps, swap)))
        return
    from trainer import registry

    most = registry.get_flavour("flux2", "demo" if args.tiny else "klein-base-9b").max_blocks_to_swap
    rows = []
    for resolution in ([64] if args.tiny else args.resolutions):
        for strategy in ("none", "conservative", "aggressive", "extreme"):
            rows.append(_child(args, strategy, resolution, None))
        rows.append(_child(args, "conservative", resolution, most // 2))
    print(f"{'strategy':<14}{'res':>6}{'swapped':>9}{'s/step':>9}{'peak VRAM GiB':>15}{'swap GiB/step':>15}")
    for row in rows:
        if "error" in row:
            print(f"{row['strategy']:<14}{row['resolution']:>6}{str(row['blocks_to_swap']):>9}  {row['error']}")
            continue
        print(f"{row['strategy']:<14}{row['resolution']:>6}{row['blocks_to_swap']:>9}{row['s_per_step']:>9.3f}"
              f"{row['peak_vram_gib']:>15.2f}{row['swap_gib_per_step']:>15.2f}")
    for resolution in sorted({r["resolution"] for r in rows}):
        at = [r for r in rows if r["resolution"] == resolution and "error" not in r]
        none = next((r for r in at if r["strategy"] == "none"), None)
        plain = next((r for r in at if r["strategy"] == "conservative" and not r["blocks_to_swap"]), None)
        half = next((r for r in at if r["strategy"] == "conservative" and r["blocks_to_swap"]), None)
        if none:
            ratios = ", ".join(f"{r['strategy']}{'+swap' if r is half else ''} "
                               f"{r['s_per_step'] / none['s_per_step']:.2f}x" for r in at if r is not none)
            print(f"{resolution} px, s/step against none: {ratios}")
        if plain and half:
            print(f"{resolution} px, swapping {half['blocks_to_swap']} blocks costs "
                  f"{(half['s_per_step'] / plain['s_per_step'] - 1) * 100:+.1f} % against none swapped "
                  "(both checkpointed; target <= 15 % at 1024 px)")


if __name__ == "__main__":
    main()
