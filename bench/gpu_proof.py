"""The GPU proof: FLUX.2 [klein] base 9B at real size on one CUDA GPU, an 8 GB card emulated. Run it with
bench/gpu_proof.sh (≤ 8 minutes on one H100); `--dry-run` runs the same logic on the CPU at tiny widths (CI).

It fabricates klein base 9B (hub layout, python -m trainer fabricate; a few generated 1024 px images) and trains
each case below in this process, the user's own Session on the job the 8 GB preset makes, with
`torch.cuda.set_per_process_memory_fraction` capping the process at the 8 GB profile's usable memory (the CUDA
context counted) where a case says so. Text embeddings are cached on disk by the first case and read by the others;
latents too, by the cases of the same base precision (the latent cache's key holds it). For each case: s/step (the
last step), the peak VRAM of the step (torch.cuda.max_memory_allocated, reset each step) and the estimator's
training-step tensors for the plan the session ran (trainer/estimator/core.py: its phase minus the CUDA context and
allocator overhead, which max_memory_allocated does not see). Then the targets:

  8gb-capped / no-savers     the 8 GB preset at 1024 px, capped at 8 GiB, against the same job with no memory
                             savers (bf16 base, nothing swapped or checkpointed) uncapped: ≤ 1.5x
  half-swapped / none-swapped  conservative, half the blocks swapped against none, 1024 px: ≤ 1.15x
  estimate vs measured       every strategy (none, conservative, aggressive, extreme) and the preset: ±10 %
  bases                      fp8, int8, int4 and nf4 bases train a step on CUDA

Exit 0 when every case ran and every target holds (the dry run checks that every case ran and was measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESET = "flux2-klein-base-9b-8gb"
CAP_GIB = 8.0


@dataclass
class Case:
    name: str
    edits: dict[str, Any]
    steps: int = 1
    cap: bool = False
    result: dict[str, Any] = field(default_factory=dict)


def cases() -> list[Case]:
    half = 16  # of klein base 9B's 32 blocks
    bf16 = {"model": {"base_precision": "bf16"}}
    return [
        Case("8gb-capped", {}, steps=2, cap=True),
        Case("no-savers", {**bf16, "lowvram": {"strategy": "none", "blocks_to_swap": 0, "fused_backward": False,
                                               "gradient_checkpointing": False, "cpu_offload_checkpointing": False}},
             steps=2),
        Case("half-swapped", {**bf16, "lowvram": {"strategy": "conservative", "blocks_to_swap": half}}, steps=2),
        Case("none-swapped", {**bf16, "lowvram": {"strategy": "conservative", "blocks_to_swap": 0}}, steps=2),
        Case("aggressive", {**bf16, "lowvram": {"strategy": "aggressive", "blocks_to_swap": half}}),
        Case("extreme", {**bf16, "lowvram": {"strategy": "extreme"}}),
        *[Case(f"base-{p}", {"model": {"base_precision": p}, "lowvram": {"strategy": "conservative",
                                                                         "blocks_to_swap": 0}})
          for p in ("fp8", "int8", "int4", "nf4")],
    ]


def tiny_flavour() -> Any:
    """klein base 9B's depth (8 double + 24 single blocks, so its block counts and presets apply) at tiny widths,
    registered under its own name for this process: the dry run's model."""
    from trainer import registry

    real = registry.get_flavour("flux2", "klein-base-9b")
    # one head of 128, the head dim the rotary embedding of every FLUX.2 needs
    tiny = replace(real, hidden_size=128, num_heads=1, joint_attention_dim=48, max_blocks_to_swap=registry._DERIVE)
    registry.FAMILIES["flux2"].flavours[real.name] = tiny
    return tiny


def _job(model: Path, work: Path, case: Case, resolution: int) -> Any:
    from trainer.profiles import apply_layers, get_preset
    from trainer.spec import parse_spec

    preset = get_preset(PRESET)
    lowvram = case.edits.get("lowvram", {})
    if lowvram:  # a case that names its strategy runs it: the preset's own [lowvram] choices step aside
        stated = {key: None for key in preset.spec.get("lowvram", {}) if key not in ("strategy", "vram_gib")}
        lowvram = {**stated, **lowvram}
    edits = {"model": {"source": str(model), **case.edits.get("model", {})},
             "lowvram": lowvram,
             "data": {"datasets": [{"path": str(work / "dataset")}], "resolution": resolution,
                      "cache_dir": str(work / "cache")},
             "train": {"max_steps": case.steps, "gradient_accumulation": 1},
             "sample": {"prompts": []},
             "output": {"dir": str(work / "runs" / case.name), "name": case.name, "save_state": False}}
    return parse_spec(apply_layers({}, preset.profile, preset, edits))


def _predicted(spec: Any, cap: float | None, plan: Any) -> float:
    """The estimator's training-step tensors on the GPU for the plan the session ran, GiB (no CUDA context, no
    allocator overhead)."""
    from trainer.estimator.auto import estimate_as_run
    from trainer.estimator.core import CONTEXT, OVERHEAD

    parts = estimate_as_run(spec, cap, plan=plan).phases["training step"].parts
    return sum(value for name, value in parts.items() if name not in (CONTEXT, OVERHEAD))


def _outside_allocator_gib() -> float:
    """GPU memory this process holds outside torch's allocator (the CUDA context, cuBLAS's workspace), which
    set_per_process_memory_fraction does not limit: what the device uses beyond what torch has reserved (the proof
    runs alone on its GPU)."""
    import torch

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**30


def run_case(case: Case, spec: Any, cuda: bool) -> None:
    import torch

    from trainer import events
    from trainer.session import Session

    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    usable = spec.lowvram.vram_gib or CAP_GIB  # the 8 GB profile's usable memory, the CUDA context included
    if cuda:
        torch.cuda.empty_cache()
        cap = (usable - _outside_allocator_gib()) / total if case.cap else 1.0
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap))
    steps: list[events.Progress] = []
    started = time.perf_counter()
    try:
        session = Session(spec, emit=lambda e: steps.append(e) if isinstance(e, events.Progress) else None)
        try:
            session.run()
        finally:
            session.end()
        last = steps[-1]
        predicted = _predicted(session.spec, usable if case.cap else total or None, session.plan)
        plan = session.plan
        case.result = {"s_per_step": round(last.step_seconds, 2), "peak_vram_gib": round(last.vram_gib, 2),
                       "predicted_gib": round(predicted, 2),
                       "plan": {"strategy": plan.strategy, "blocks_to_swap": plan.blocks_to_swap,
                                "cpu_offload_checkpointing": plan.cpu_offload_checkpointing,
                                "fused_backward": plan.fused_backward, "optimizer_offload": plan.optimizer_offload},
                       "seconds": round(time.perf_counter() - started, 1)}
    except Exception as exc:  # noqa: BLE001 - a case that fails is reported and the proof goes on
        case.result = {"error": f"{type(exc).__name__}: {exc}"[:400], "trace": traceback.format_exc()[-1500:]}
    if cuda:
        torch.cuda.empty_cache()


def prepare(work: Path, dry_run: bool) -> tuple[Path, int]:
    """The fabricated model (reused when complete) and the images; (model folder, resolution)."""
    from trainer import registry
    from trainer.demo import build_demo_dataset
    from trainer.fabric.make import existing, fabricate

    flavour = tiny_flavour() if dry_run else registry.get_flavour("flux2", "klein-base-9b")
    resolution = 64 if dry_run else 1024
    model = work / ("klein-base-9b-tiny" if dry_run else "klein-base-9b-hub")
    if existing(model, flavour, "hub", 0) is None:
        if model.exists():
            import shutil

            shutil.rmtree(model)  # another flavour's or size's: never trusted
        started = time.perf_counter()
        made = fabricate(flavour, "hub", model, small_encoders=dry_run)
        print(f"fabricated {flavour.label}{' (tiny)' if dry_run else ''}: {made.bytes / 2**30:.1f} GiB in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    if not (work / "dataset").is_dir():
        build_demo_dataset(work, count=2, size=resolution)
    return model, resolution


def verdicts(by_name: dict[str, Case], dry_run: bool) -> list[tuple[str, str, bool]]:
    """(target, value, holds) for each target; on the dry run the values are shown, not judged."""
    def seconds(name: str) -> float | None:
        return by_name[name].result.get("s_per_step")

    lines: list[tuple[str, str, bool]] = []
    for what, slow, fast, limit in (("8 GB preset capped / no savers", "8gb-capped", "no-savers", 1.5),
                                    ("half the blocks swapped / none", "half-swapped", "none-swapped", 1.15)):
        a, b = seconds(slow), seconds(fast)
        ratio = a / b if a and b else None
        text = "n/a" if ratio is None else f"{ratio:.2f}x (target <= {limit}x)"
        lines.append((what, text, dry_run or (ratio is not None and ratio <= limit)))
    for case in by_name.values():
        measured, predicted = case.result.get("peak_vram_gib"), case.result.get("predicted_gib")
        if measured is None:
            lines.append((f"{case.name} ran", case.result.get("error", "no result"), False))
            continue
        off = (measured - predicted) / predicted if predicted and measured else None
        text = f"{measured:.2f} measured / {predicted:.2f} estimated" + ("" if off is None else f" ({off:+.0%})")
        lines.append((f"{case.name} estimate", text, dry_run or (off is not None and abs(off) <= 0.10)))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same logic on the CPU at tiny widths")
    parser.add_argument("--work", default="/tmp/gpu_proof", help="model, images, caches and runs")
    parser.add_argument("--json", help="write the results to this file too")
    args = parser.parse_args(argv)
    if args.dry_run:  # the session picks the GPU where there is one: the dry run is the CPU's
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from trainer.quiet import disable_loading_bars, silence_library_noise

    silence_library_noise()
    disable_loading_bars()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA GPU here; run it on one, or --dry-run for the logic on the CPU", file=sys.stderr)
        return 2
    from trainer import registry

    real = registry.get_flavour("flux2", "klein-base-9b")
    try:
        return _prove(Path(args.work), args.dry_run, cuda, args.json)
    finally:  # the dry run's tiny flavour stood in for the real one in this process only
        registry.FAMILIES["flux2"].flavours[real.name] = real


def _prove(work: Path, dry_run: bool, cuda: bool, json_path: str | None) -> int:
    work.mkdir(parents=True, exist_ok=True)
    model, resolution = prepare(work, dry_run)
    order = cases()
    order.insert(0, order.pop(3))  # none-swapped first, uncapped: it fills the text and latent caches
    print(f"{'case':14}{'s/step':>8}{'peak VRAM':>11}{'estimate':>10}{'wall s':>8}", flush=True)
    for case in order:
        if dry_run:
            case.steps = 1  # the logic, not the timing
        run_case(case, _job(model, work, case, resolution), cuda)
        r = case.result
        if "error" in r:
            print(f"{case.name:14} failed: {r['error']}", flush=True)
            continue
        print(f"{case.name:14}{r['s_per_step']:>8.2f}{r['peak_vram_gib']:>11.2f}{r['predicted_gib']:>10.2f}"
              f"{r['seconds']:>8.1f}", flush=True)
    lines = verdicts({case.name: case for case in order}, dry_run)
    for what, value, holds in lines:
        print(f"{'ok ' if holds else 'NO '} {what}: {value}")
    if json_path:
        Path(json_path).write_text(json.dumps({c.name: c.result for c in order}, indent=2), encoding="utf-8")
    return 0 if all(holds for _, _, holds in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
