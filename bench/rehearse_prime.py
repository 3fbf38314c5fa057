"""Fills a job's disk text-embedding cache with the text encoders alone (no transformer loaded), as the trainer
itself would fill it: what bench/rehearse.py --prime-text runs first, in its own process, so that a flavour whose
first run holds more than this machine's RAM (the text encoder beside the transformer) rehearses a repeated run.

    python bench/rehearse_prime.py JOB.toml
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(job: str) -> int:
    import torch

    from trainer import registry
    from trainer.__main__ import _load_job
    from trainer.data.caching import InputCaches
    from trainer.data.health import check_datasets
    from trainer.data.planning import plan_training_items
    from trainer.estimator.auto import resolve_lowvram
    from trainer.events import JsonlWriter
    from trainer.families import family_ops
    from trainer.memory.system_ram import available_ram_gib
    from trainer.preflight import model_source
    from trainer.prompts import sample_prompts
    from trainer.quiet import disable_loading_bars, silence_library_noise
    from trainer.sources import model_files
    from trainer.spec import with_text_encoder_precision

    silence_library_noise()
    disable_loading_bars()
    spec = _load_job(job, [])
    # text_encoder_precision = "auto" as the session on this machine will resolve it: the cache keys must agree
    chosen = resolve_lowvram(spec, None, ram_gib=available_ram_gib()).text_encoder_precision
    spec = with_text_encoder_precision(spec, chosen)
    if spec.data.cache_text_embeddings != "disk":
        raise SystemExit("error: data.cache_text_embeddings must be 'disk' to prime it")
    flavour = registry.get_flavour(spec.model.family, spec.model.flavour)
    ops = family_ops(spec.model.family)
    items, _ = plan_training_items(spec, check_datasets(spec))
    captions = [item.caption for item in items] + [""] + [prompt.text for prompt in sample_prompts(spec)]
    output = Path(spec.output.dir)
    output.mkdir(parents=True, exist_ok=True)
    emit = JsonlWriter(output / "prime_events.jsonl")
    from trainer.events import PhaseChanged

    emit(PhaseChanged(phase="loading", detail="text encoders only"))
    # the session's compute dtype and text encoder storage (a quantised encoder computes in bf16)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.train.mixed_precision, torch.float32)
    pipe = ops.load_pipeline(model_source(spec), flavour, dtype, skip=("transformer",), files=model_files(spec.model),
                             text_encoder_precision=spec.model.text_encoder_precision)
    from trainer.memory.placement import TextEncoderPlacement

    placement = TextEncoderPlacement(pipe, torch.device("cpu"), "cpu")  # on the CPU, its heap trimmed per layer
    caches = InputCaches(spec, ops, flavour, emit, lambda: False, output)
    caches.fill_text(pipe, captions)
    placement.release()
    emit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
