"""One training session, read top to bottom: setup → train → validate → save → end.

The runner (app thread) and the CLI drive the same class; it talks back only through events and listens
only to the `Commands` object, checked between steps.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer import distributed, flow, registry
from trainer.adapters import add_adapter
from trainer.attention import TRAINS_WITH, sampling_attention, set_backend
from trainer.checkpoint import (
    latest_state,
    load_training_state,
    lora_bytes,
    lora_metadata,
    prune_checkpoints,
    remove_interrupted_writes,
    repair_incomplete_loras,
    save_lora_files,
    save_training_state,
    saved_states,
    set_aside_earlier_run,
    state_path,
    tensor_bytes,
)
from trainer.clip_score import clip_scores
from trainer.compiled_blocks import CompiledBlocks, compile_failure, compiler_problem, root_cause
from trainer.data.cache import TextEmbeddingCache
from trainer.data.caching import InputCaches, stack_references
from trainer.data.datasets import TrainItem
from trainer.data.health import check_datasets
from trainer.data.health_report import HealthReport
from trainer.data.pairs import reference_for_sampling, sample_references
from trainer.data.planning import plan_training_items
from trainer.ema import LoraEma, ema_name
from trainer.errors import UserError
from trainer.estimator.auto import resolve_lowvram
from trainer.estimator.plans import LowVramPlan
from trainer.events import (
    ClipScore,
    EvalLoss,
    Event,
    JsonlWriter,
    LogMessage,
    LoraSaved,
    PhaseChanged,
    Progress,
    RunFinished,
    RunStarted,
    SampleSaved,
)
from trainer.families import family_ops
from trainer.files import (
    describe_write_error,
    disk_full,
    disk_full_text,
    size_text,
    unwritable_reason,
    write_atomic,
)
from trainer.lora_formats import lora_filename
from trainer.memory.cache_release import CacheRelease
from trainer.memory.checkpointing import ActivationOffloader, enable_block_checkpointing
from trainer.memory.heap import release_freed_heap
from trainer.memory.optimizer_memory import FusedBackward, build_training_optimizer
from trainer.memory.placement import TextEncoderPlacement, place_transformer
from trainer.memory.quantize import quantised_sizes
from trainer.memory.system_ram import RamVerdict, ram_verdict
from trainer.optimizers import build_optimizer, build_scheduler, effective_learning_rate
from trainer.preflight import check_files, model_source
from trainer.previews import FOLDER as PREVIEW_FOLDER
from trainer.previews import LivePreviews, load_tiny_decoder, preview_steps
from trainer.prompts import SamplePrompt, sample_prompts
from trainer.quiet import disable_loading_bars
from trainer.sources import model_files
from trainer.spec import (
    JobSpec,
    LowVramSection,
    modulation_format,
    save_spec,
    spec_to_toml,
    with_text_encoder_precision,
)
from trainer.trackers import TrackerLogger
from trainer.tread import TreadConfig, transformer_blocks, tread_routing

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_FORMAT = 1
_EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
# What a saved state must agree with to be resumed: the model, the adapter and the data it was trained on.
_RESUME_SECTIONS = ("model", "lora", "data")


class _NoCommands:
    stop_requested = False

    def take_sample_request(self) -> bool:
        return False

    def take_save_request(self) -> bool:
        return False


def memory_gib(device: torch.device) -> dict[str, float]:
    """Resident memory of this process and, on a GPU, the peak allocated since the last reset."""
    import psutil

    vram = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"ram_gib": psutil.Process().memory_info().rss / 2**30, "vram_gib": vram}


def _flat(spec: JobSpec) -> dict[str, Any]:
    """`section.key` → scalar, for trackers' hyper-parameter tables."""
    flat: dict[str, Any] = {}
    for section, values in spec.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_vram_gib(device: torch.device) -> float | None:
    """The GPU's total memory, for the auto strategy; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


@dataclass
class _Draws:
    """Everything random about one micro-batch, drawn before anything is computed."""

    indices: list[int]
    latents: torch.Tensor
    captions: list[str]
    noise: torch.Tensor
    sigmas: torch.Tensor
    guidance: torch.Tensor | None
    references: torch.Tensor | None = None  # edit pairs: the reference latents beside the noisy targets


class Session:
    def __init__(self, spec: JobSpec, emit: Callable[[Event], None] | None = None, commands: Any = None,
                 resume: bool = False, ram_check: str = "warn") -> None:
        self.spec = spec
        self.resume = resume
        self.ram_check = ram_check  # "refuse": a run whose RAM will not fit stops before loading (CLI, no --force)
        self.block_cache: tuple[Path, list] | None = None  # (file, block records) with lowvram.swap_from = "disk"
        self.flavour = registry.get_flavour(spec.model.family, spec.model.flavour)
        self.ops = family_ops(spec.model.family)
        self.output_dir = Path(spec.output.dir)
        # several processes (accelerate launch): rank, mode, device; see trainer/distributed.py
        self.dist = distributed.start(spec)
        self.commands = distributed.StepCommands(commands or _NoCommands(), distributed.stop_file(self.output_dir),
                                                 self.dist)
        self._listeners: list[Callable[[Event], None]] = [emit] if emit else []
        self._jsonl: JsonlWriter | None = None
        self._trackers: TrackerLogger | None = None
        # What the run said before its records opened (see _open_records); None once they are open.
        self._held: list[Event] | None = []
        self.eval_indices: list[int] = []
        self.step = 0
        self.device = self.dist.device or pick_device()
        # quantised bases compute in bf16; the others compute in the dtype they are stored in
        self.compute_dtype = _DTYPES.get(spec.model.base_precision, torch.bfloat16)
        self.pipe: Any = None
        self.transformer: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: Any = None
        self.grad_scaler: Any = None
        self.items: list[TrainItem] = []
        self.latents: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self.references: list[torch.Tensor | None] = []
        self.sample_references: list[Path | None] = []
        self.prompts: list[SamplePrompt] = []
        self.text_cache = TextEmbeddingCache()
        self.generator = torch.Generator("cpu").manual_seed(spec.train.seed)
        # TREAD draws from its own stream so turning it on does not change the noise and timesteps.
        self.tread_generator = torch.Generator("cpu").manual_seed(self.dist.rank_seed(spec.train.seed + 1))
        self._order: list[list[int]] = []
        self.losses: list[float] = []
        self.last_lora_path: Path | None = None
        self._final: tuple[int, Path | None] | None = None  # (step, final LoRA or None: nothing new to save)
        self._sampled_step: int | None = None  # the step of the last samples
        self._tiny_decoder: Any = None  # sample.preview_decoder, loaded at the first preview; waits beside the VAE
        from trainer.memory.system_ram import available_ram_gib

        # auto puts swapped blocks on disk when this machine's RAM needs it (lowvram.swap_from unset)
        plan = resolve_lowvram(spec, device_vram_gib(self.device), self.dist.world_size,
                               ram_gib=available_ram_gib())
        self.plan: LowVramPlan = self.dist.adjust_plan(plan)
        # model.text_encoder_precision = "auto" made concrete: the loaders and the embedding cache's keys read it
        self.spec = spec = with_text_encoder_precision(spec, self.plan.text_encoder_precision)
        self.grad_sync: distributed.GradientSync | None = None
        self.swapper: Any = None
        self.offloader: ActivationOffloader | None = None
        self._text_placement: TextEncoderPlacement | None = None
        self.ema: LoraEma | None = None  # train.ema_decay
        self.compiled: CompiledBlocks | None = None  # train.compile
        self.cache_release = CacheRelease(spec.lowvram.empty_cache_every or 0, self.device.type)

    def emit(self, event: Event) -> None:
        if not self.dist.is_main:  # rank 0 speaks for the run
            return
        for listener in self._listeners:
            listener(event)
        if self._held is not None:
            self._held.append(event)

    # ------------------------------------------------------------------ the whole run

    def run(self) -> Path | None:
        """Begin, train to max_steps (or until stopped), finish; returns the final LoRA file. The step-by-step control
        (trainer/runners/thread.py) calls the same three: begin, train in chunks, finish.

        A failure is reported as a RunFinished event (and in events.jsonl) before it propagates.
        """
        try:
            self.begin()
            self.train()
            return self.finish()
        except UserError as exc:
            self.emit(RunFinished(status="failed", step=self.step, message=str(exc)))
            raise
        except Exception as exc:
            if disk_full(exc):  # between saves (the log, a sample, a cache): the same one message as in a save
                folder = Path(exc.filename).parent if getattr(exc, "filename", None) else self.output_dir
                error = self._write_failed(folder, exc, doing="write")
                self.emit(RunFinished(status="failed", step=self.step, message=str(error)))
                raise error from None
            self.emit(LogMessage(level="error", message=traceback.format_exc()))
            self.emit(RunFinished(status="failed", step=self.step, message=f"{type(exc).__name__}: {exc}"))
            raise

    def begin(self) -> None:
        """Set up, then render the baseline samples every later sample is compared with (a fresh run that samples
        on an interval)."""
        self.setup()
        if self.step == 0:
            self._final = (0, None)  # nothing trained yet: nothing to save (a resumed state's LoRA is written again)
        if self.spec.sample.prompts and self.spec.sample.every_steps and self.step == 0:
            self.validate()

    def save_final(self) -> Path | None:
        """The final LoRA (and state) at this step, written once however often it is asked for; None when nothing
        was trained since setup or resume."""
        if self._final is None or self._final[0] != self.step:
            self._final = (self.step, self.save())
        return self._final[1]

    def finish(self) -> Path | None:
        """Save the final LoRA, render the final samples (unless this step's were rendered already) and report
        RunFinished: completed at max_steps, stopped before."""
        path = self.save_final()
        if self.spec.sample.prompts and self._sampled_step != self.step:
            self.validate()
        status = "completed" if self.step >= self.spec.train.max_steps else "stopped"
        message = f"LoRA saved to {path}" if path else "nothing was trained; no LoRA saved"
        self.emit(RunFinished(status=status, step=self.step, lora_path=str(path or ""), message=message))
        return path

    # ------------------------------------------------------------------ setup

    def spec_as_run(self) -> JobSpec:
        """The job with the low-VRAM plan that runs written out (the bundle, blocks swapped, offloads), not the
        'auto' or partial settings it was asked with: what job.resolved.toml and the LoRA's header record."""
        ran = {key: getattr(self.plan, key) for key in LowVramSection.model_fields if hasattr(self.plan, key)}
        return self.spec.model_copy(update={"lowvram": self.spec.lowvram.model_copy(update=ran)})

    def setup(self) -> None:
        spec = self.spec
        problems = check_files(spec) + self.dist.problems
        if problems:
            raise UserError("\n".join(problems))
        self.prompts = sample_prompts(spec)
        # Before the output folder is touched: a dataset that cannot train leaves an earlier run's files in place.
        health = check_datasets(spec)
        if health.verdict == "will not train":
            raise UserError("the dataset cannot train:\n" + health.table())
        # before the output folder is touched: a run refused for its RAM moves no earlier run aside
        ram = self._judge_ram(health)
        if self.dist.is_main and (reason := unwritable_reason(self.output_dir)):
            raise UserError(f"output.dir: cannot write in '{self.output_dir}' ({reason}); choose a folder you can "
                            "write to, or fix its permissions")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.commands.clear_stale_stop()
        repairs = []
        if self.dist.is_main:
            remove_interrupted_writes(self.output_dir)  # what a run killed mid-save left behind
            repairs = self._repair_loras()
        if self.resume:
            self._open_records()  # the run goes on in its own records: nothing to set aside
        self.emit(RunStarted(max_steps=spec.train.max_steps, output_dir=str(self.output_dir),
                             family=spec.model.family, flavour=spec.model.flavour))
        for message in repairs:
            self.emit(LogMessage(level="warning", message=message))
        torch.manual_seed(spec.train.seed)
        if self.dist.world_size > 1:
            self.emit(LogMessage(level="info", message=f"distributed: {self.dist.describe()}"))
        self.emit(LogMessage(level="info", message=f"low-VRAM plan: {self.plan.describe()}"))
        self.emit(LogMessage(level="info" if ram.verdict == "fits" else "warning", message=ram.line()))
        self.items = self._plan_items(health)
        self.sample_references = sample_references(spec, self.items, len(self.prompts))  # edit flavours' `image=`
        self.eval_indices = self._held_out_indices()
        caches = InputCaches(spec, self.ops, self.flavour, self.emit, lambda: self.commands.stop_requested,
                             self.output_dir)
        captions = [item.caption for item in self.items] + [""] + [prompt.text for prompt in self.prompts]
        # several processes with a disk cache: rank 0 fills it, then the others read it warm. One model at a time:
        # the text encoders cache the embeddings and are freed before the transformer loads.
        with self.dist.main_first(caches.text_disk is not None or caches.latent_disk is not None or self._on_disk()):
            self._load_pipeline(skip_text_encoders=caches.text_is_warm(captions))
            caches.fill_text(self.pipe, captions)
            self._release_text_encoders()
            caches.fill_latents(self.pipe, self.items)
            self._park_vae()
            self._load_transformer(caches.folder)
        self.text_cache, self.latents, self.masks = caches.text, caches.latents, caches.masks
        self.references = caches.references
        self.emit(LogMessage(level="info", message=f"caches: {caches.summary()}"))
        self._add_lora()
        self.dist.seed_rank(spec.train.seed)  # every rank built the same adapter; dropout now draws per rank
        self._make_optimizer()
        if spec.train.ema_decay:
            where = torch.device("cpu") if spec.train.ema_device == "cpu" else self.device
            self.ema = LoraEma(self.lora_parameters(), spec.train.ema_decay, where)
        if self.resume:
            self._resume_latest()
        self._open_records()  # a new run: only now, with everything loaded, is an earlier one set aside

    def _open_records(self) -> None:
        """Start this run's records in output_dir: an earlier run's files set aside (a new run), events.jsonl with
        everything said so far, the trackers, job.resolved.toml. A new run does this once its first step is about
        to train, so a start that fails before (a download, a model that will not load) moves and writes nothing."""
        if not self.dist.is_main or self._held is None:
            return
        spec = self.spec
        earlier = None if self.resume else set_aside_earlier_run(self.output_dir, spec.output.name)
        self._jsonl = JsonlWriter(self.output_dir / "events.jsonl")
        if spec.output.log_with:
            self._trackers = TrackerLogger(spec.output.log_with, self.output_dir, spec.output.name, _flat(spec))
        held, self._held = self._held, None
        for listener in (self._jsonl, self._trackers):
            if listener is not None:
                for event in held:
                    listener(event)
                self._listeners.append(listener)
        save_spec(self.spec_as_run(), self.output_dir / "job.resolved.toml")
        if earlier is not None:
            self.emit(LogMessage(level="info", message=f"the earlier run's LoRA, states, samples and log in this "
                                                       f"output folder were moved to {earlier}"))

    def _plan_items(self, health: HealthReport) -> list[TrainItem]:
        """One item per image, resolution and bucket; the health check's findings and the plan go to the log."""
        spec = self.spec
        self.emit(PhaseChanged(phase="checking dataset", detail=f"{len(spec.data.datasets)} folder(s)"))
        if health.rows:
            self.emit(LogMessage(level="warning", message="dataset check:\n" + health.table()))
        items, plan = plan_training_items(spec, health)
        self.emit(LogMessage(level="info", message=plan.report()))
        if not items:
            raise UserError("data: no image fits any bucket; lower data.resolution or raise data.max_upscale")
        return items

    def _on_disk(self) -> bool:
        return self.plan.swap_from == "disk" and self.plan.blocks_to_swap > 0 and not self.dist.sharded

    def _judge_ram(self, health: HealthReport) -> RamVerdict:
        """The RAM verdict before anything loads (trainer/memory/system_ram.py), for a first run or, when every
        caption's embedding is cached, a repeated one; a run that will not fit stops here when the CLI asked to
        refuse it. Blocks on disk: a disk without room for the block cache refuses, with the size needed."""
        spec, vram = self.spec, device_vram_gib(self.device)
        items, _ = plan_training_items(spec, health)
        captions = [item.caption for item in items] + [""] + [prompt.text for prompt in self.prompts]
        caches = InputCaches(spec, self.ops, self.flavour, lambda event: None, lambda: False, self.output_dir)
        verdict = ram_verdict(spec, self.plan, vram, warm=caches.text_is_warm(captions), gpus=self.dist.world_size)
        if verdict.verdict == "will not fit" and self.ram_check == "refuse":
            raise UserError(f"{verdict.line()}. Change that setting, or start anyway with --force")
        if self._on_disk():
            from trainer.estimator.auto import estimate_as_run
            from trainer.memory.block_store import check_room

            path = self._block_cache_path(caches.folder)
            if not path.is_file():
                need = estimate_as_run(spec, vram, plan=self.plan).block_cache_gib * 1024**3
                check_room(path.parent, need * 1.01 + 64 * 1024**2)
        return verdict

    def _block_cache_path(self, cache_folder: Path) -> Path:
        from trainer.memory.block_store import cache_key
        from trainer.sources.assemble import transformer_weight_files

        spec = self.spec
        sources = transformer_weight_files(model_source(spec), self.flavour, model_files(spec.model))
        key = cache_key(sources, spec.model.base_precision, self._modulation(), self.plan.blocks_to_swap)
        return cache_folder / "blocks" / f"{key}.blocks"

    def _modulation(self) -> str | None:
        model = self.spec.model
        return modulation_format(model.family, model.base_precision, model.modulation_precision)

    def _load_pipeline(self, skip_text_encoders: bool) -> None:
        """The flavour's pipeline without its transformer (it loads once the text encoders are gone); without
        text encoders either when every embedding is already cached on disk."""
        spec = self.spec
        skip = tuple(c for c in self.flavour.components if c.startswith(("text_encoder", "tokenizer")))
        detail = model_source(spec) + (" (text encoders not needed: embeddings cached)" if skip_text_encoders else "")
        self.emit(PhaseChanged(phase="loading", detail=detail))
        disable_loading_bars()
        self.pipe = self.ops.load_pipeline(model_source(spec), self.flavour, self.compute_dtype,
                                           skip=(*(skip if skip_text_encoders else ()), "transformer"),
                                           base_precision=spec.model.base_precision,
                                           files=model_files(spec.model), emit=self.emit,
                                           text_encoder_precision=spec.model.text_encoder_precision)
        self.pipe.set_progress_bar_config(disable=True)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self.pipe, name, None) is not None and spec.model.text_encoder_precision in _DTYPES:
                getattr(self.pipe, name).to(_DTYPES[spec.model.text_encoder_precision])
        self.pipe.vae.enable_slicing()  # one image at a time through the VAE: exact, and lighter on memory
        if spec.data.vae_tiling:
            self.pipe.vae.enable_tiling()
        # the transformer loads once the caches are filled (_load_transformer): caching needs the GPU to itself
        self.pipe.vae.to(self.device)
        self._text_placement = TextEncoderPlacement(self.pipe, self.device, self.plan.text_encoder_device,
                                                    self.plan.pin_memory)

    def _load_transformer(self, cache_folder: Path) -> None:
        """The transformer, alone; with blocks on disk its swapped blocks go to the block cache as they stream in
        (or are not read at all when the cache already holds them)."""
        from trainer.memory.block_store import BlockSink
        from trainer.sources.assemble import load_transformer

        spec, sink = self.spec, None
        self.emit(PhaseChanged(phase="loading", detail=f"transformer ({spec.model.base_precision})"))
        if self._on_disk():
            path = self._block_cache_path(cache_folder)
            blocks = [f"transformer_blocks.{i}" for i in range(self.flavour.double_blocks)]
            blocks += [f"single_transformer_blocks.{i}" for i in range(self.flavour.single_blocks)]
            sink = BlockSink(blocks[:self.plan.blocks_to_swap], path, path.stem,
                             lambda message: self.emit(LogMessage(level="warning", message=message)))
        try:
            transformer = load_transformer(model_source(spec), self.flavour, self.compute_dtype,
                                           spec.model.base_precision, model_files(spec.model), self.emit,
                                           self._modulation(), sink)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        if sink is not None:
            self.block_cache = (sink.path, sink.finish())
            state = "reused" if sink.warm else "written"
            self.emit(LogMessage(level="info", message=f"block cache {state}: {sink.path}"))
        self.pipe.register_modules(transformer=transformer)
        self._report_quantised(sink.stored_bytes() if sink is not None else None)

    def _report_quantised(self, stored: dict[str, int] | None = None) -> None:
        """The log says when the frozen transformer was quantised while it loaded: format, size before and after,
        the blocks written to (or read from) the block cache included (`stored`: their tensors' bytes by name)."""
        before, after, fmt = quantised_sizes(self.pipe.transformer, stored)
        if fmt:
            self.emit(LogMessage(level="info", message=f"base transformer quantised to {fmt} while loading: "
                                 f"{size_text(before)} -> {size_text(after)}"))

    def _release_text_encoders(self) -> None:
        """Every embedding training and sampling need is cached: the text encoders are freed entirely."""
        if self._text_placement is not None:
            self._text_placement.release()
            self._text_placement = None
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        gc.collect()
        release_freed_heap()  # the encoder's freed tensors would otherwise stay resident (trainer/memory/heap.py)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _park_vae(self) -> None:
        """Latents are cached: the VAE waits in system RAM for sampling (freed if nothing is ever sampled)."""
        if not self.prompts:
            self.pipe.vae = None
            gc.collect()
        elif self.device.type == "cuda":
            self.pipe.vae.to("cpu")
            if self._tiny_decoder is not None:  # sample.preview_decoder waits beside the VAE
                self._tiny_decoder.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _add_lora(self) -> None:
        lora = self.spec.lora
        self.transformer = self.pipe.transformer
        names = add_adapter(
            self.transformer, self.spec.model.family, type=lora.type, rank=lora.rank, alpha=lora.alpha,
            dropout=lora.dropout, targets=lora.targets, init=lora.init, init_from=lora.init_from,
            base_precision=self.spec.model.base_precision,
        )
        self._choose_attention()
        self._place_transformer()
        self._compile_blocks()
        count = sum(p.numel() for p in self.trainable_parameters())
        self.emit(LogMessage(level="info", message=f"{lora.type} on {len(names)} modules, {count:,} parameters"))

    def _choose_attention(self) -> None:
        """advanced.attention for the training steps (sage renders the samples only: it has no backward)."""
        chosen = self.spec.advanced.attention
        if chosen == "sdpa":
            return
        try:
            set_backend(self.transformer, TRAINS_WITH[chosen])
        except (RuntimeError, ValueError) as exc:  # the dispatcher's own checks (e.g. a package version)
            raise UserError(f"advanced.attention: '{chosen}' cannot run here ({exc}); use the default \"sdpa\"") \
                from None
        note = " for sampling; training steps use sdpa (SageAttention has no backward pass)" if chosen == "sage" else ""
        self.emit(LogMessage(level="info", message=f"attention: {chosen}{note}"))

    def _compile_blocks(self) -> None:
        """train.compile: every block's forward compiled, once a tiny probe shows this platform can compile."""
        if not self.spec.train.compile:
            return
        problem = compiler_problem(self.device)
        if problem:
            self.emit(LogMessage(level="warning", message=f"train.compile: {problem}; training runs eager"))
            return
        self.compiled = CompiledBlocks(transformer_blocks(self.transformer))
        self.emit(LogMessage(level="info", message=f"train.compile: {len(self.compiled.blocks)} blocks compiled "
                                                   "with torch.compile (the first steps are slow while it builds)"))

    def _compile_fell_back(self, exc: BaseException) -> bool:
        """A compilation that failed mid-run: back to the eager blocks (True), or not ours to handle (False)."""
        if self.compiled is None or not self.compiled.active or not compile_failure(exc):
            return False
        self.compiled.revert()
        self.emit(LogMessage(level="warning", message=f"train.compile: compiling the blocks failed "
                                                      f"({root_cause(exc)}); training goes on "
                                                      "eager. Set train.compile = false to skip the attempt"))
        return True

    def _place_transformer(self) -> None:
        """Checkpointing by the plan (swapped blocks always), then the transformer onto the GPU but for the frozen
        weights of its swapped blocks, which stream from CPU memory."""
        plan, blocks = self.plan, transformer_blocks(self.transformer)
        if plan.gradient_checkpointing:
            if plan.cpu_offload_checkpointing:
                self.offloader = ActivationOffloader(self.device, plan.pin_memory)
            enable_block_checkpointing(self.transformer, blocks, plan.checkpointing_interval,
                                       range(plan.blocks_to_swap), self.offloader)
        if self.dist.sharded:  # FSDP: each GPU holds its share of the frozen base (no swap: adjust_plan)
            self.dist.shard_transformer(self.transformer, blocks)
            return
        self.swapper = place_transformer(self.transformer, blocks, self.device, plan.blocks_to_swap,
                                         plan.swap_prefetch, plan.pin_memory, disk=self.block_cache)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors by name: what the state, the EMA and the LoRA files hold."""
        return {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def _make_optimizer(self) -> None:
        train = self.spec.train

        def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            return build_optimizer(params, train.optimizer, train.learning_rate, weight_decay=train.weight_decay,
                                   device_type=params[0].device.type)

        # before the optimiser: with fused backward the averaging hooks must run before the stepping ones
        self.grad_sync = self.dist.gradient_sync(self.trainable_parameters(), per_parameter=self.plan.fused_backward)
        self.optimizer, self.lr_scheduler = build_training_optimizer(
            self.trainable_parameters(), build,
            lambda optimizer: build_scheduler(optimizer, train.scheduler, train.warmup_steps, train.max_steps),
            offload=self.plan.optimizer_offload, fused_backward=self.plan.fused_backward,
            max_grad_norm=train.max_grad_norm, pin_memory=self.plan.pin_memory)
        # fp16 activations underflow small gradients; the scaler keeps them representable (a no-op otherwise).
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=train.mixed_precision == "fp16")

    # ------------------------------------------------------------------ state for exact resume

    def _section_identity(self, section: str) -> str:
        return json.dumps(self.spec.to_dict()[section], sort_keys=True)

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on: adapter, optimiser, scheduler, every RNG, the data order."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "identity": {k: self._section_identity(k) for k in _RESUME_SECTIONS},
            "lora": {n: p.detach().to("cpu").clone() for n, p in self.lora_parameters().items()},
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "generator": self.generator.get_state(),
            "tread_generator": self.tread_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            # one process saves every GPU's stream; a rank only its own GPU's, under "ranks"
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and self.dist.world_size == 1
            else [],
            "order": [list(batch) for batch in self._order],
            "losses": list(self.losses),
            "world_size": self.dist.world_size,
            "ranks": self.dist.rng_states(self.tread_generator),  # a collective: every rank's dropout and TREAD
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "state") -> None:
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"{source}: saved by another version of the trainer (format {state.get('format')})")
        changed = [k for k in _RESUME_SECTIONS if state["identity"].get(k) != self._section_identity(k)]
        if changed:
            raise UserError(f"{source}: the job's [{'], ['.join(changed)}] settings differ from the run being "
                            "resumed; restore them, or start a new run in another output.dir")
        params = self.lora_parameters()
        if set(params) != set(state["lora"]):
            raise UserError(f"{source}: its adapter does not match this job's (lora.targets or lora.type differ)")
        with torch.no_grad():
            for name, value in state["lora"].items():
                params[name].copy_(value)
        self._load_ema(state.get("ema") or {}, source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.generator.set_state(state["generator"])
        self.tread_generator.set_state(state["tread_generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available() and self.dist.world_size == 1:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if warning := self.dist.restore_rng(state, self.tread_generator):  # several processes: each rank's own
            self.emit(LogMessage(level="warning", message=f"{source}: {warning}"))
        self._order = [list(batch) for batch in state["order"]]
        self.losses = list(state["losses"])
        self.step = int(state["step"])

    def _load_ema(self, saved: dict[str, torch.Tensor], source: str) -> None:
        """The EMA as saved; a state saved without one (the EMA turned on since) starts it from the weights."""
        if self.ema is None:
            return
        if not saved:
            self.ema = LoraEma(self.lora_parameters(), self.ema.decay, self.ema.device)
            self.emit(LogMessage(level="warning", message=f"{source}: saved without an EMA (train.ema_decay was "
                                                          "off); the EMA starts from the resumed weights"))
            return
        self.ema.load_state_dict(saved)

    def _resume_latest(self) -> None:
        """The newest state that reads; a damaged newer one (a disk that lied about a flush) is named and passed."""
        states = saved_states(self.output_dir)
        if not states:
            raise UserError(f"output.dir: no saved training state in '{self.output_dir / 'state'}' to resume; "
                            "run without --resume to start afresh")
        for index, (_, path) in enumerate(reversed(states)):
            try:
                state = load_training_state(path)
            except UserError as exc:
                if index == len(states) - 1:
                    raise
                self.emit(LogMessage(level="warning", message=f"{exc}; trying the state before it"))
                continue
            self.load_state_dict(state, str(path))
            self.emit(LogMessage(level="info", message=f"resumed from {path} at step {self.step}"))
            return

    # ------------------------------------------------------------------ training

    def _held_out_indices(self) -> list[int]:
        """Every placement of the last `data.eval_holdout` images of the first dataset: never trained on."""
        count = self.spec.data.eval_holdout
        if not count:
            return []
        folder = Path(self.spec.data.datasets[0].path)
        first = list(dict.fromkeys(item.image_path for item in self.items if item.image_path.parent == folder))
        held_out = set(first[len(first) - count:])
        return [i for i, item in enumerate(self.items) if item.image_path in held_out]

    def _next_batch(self) -> list[int]:
        """Item indices of one batch; every batch holds latents of one shape (one resolution)."""
        if not self._order:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            held_out = set(self.eval_indices)
            for index, item in enumerate(self.items):
                if index in held_out:
                    continue
                reference = self.references[index] if self.references else None  # loose pairs: shapes differ
                shape = tuple(self.latents[index].shape) + (() if reference is None else tuple(reference.shape))
                by_shape.setdefault(shape, []).extend([index] * item.repeats)
            batches: list[list[int]] = []
            size = self.spec.train.batch_size
            for indices in by_shape.values():
                perm = torch.randperm(len(indices), generator=self.generator).tolist()
                shuffled = [indices[i] for i in perm]
                batches += [shuffled[i:i + size] for i in range(0, len(shuffled) - size + 1, size)]
            if not batches:
                raise UserError(f"train.batch_size: {size} is larger than every resolution group of the dataset")
            order = torch.randperm(len(batches), generator=self.generator).tolist()
            self._order = [batches[i] for i in order]
        return self._order.pop(0)

    def _draw(self, indices: list[int]) -> _Draws:
        """Caption dropout, noise, timesteps and guidance of a batch, from the generator every rank shares."""
        spec = self.spec
        latents = torch.cat([self.latents[i] for i in indices])
        captions = [self.items[i].caption for i in indices]
        if spec.data.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=self.generator) < spec.data.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        noise = torch.randn(latents.shape, generator=self.generator)
        mu = self.ops.shift_mu(self.ops.image_seq_len(latents), self.flavour)
        sigmas = flow.sample_sigmas(spec.advanced, len(indices), mu, self.generator)
        guidance = None
        if self.flavour.guidance == "embedded":
            guidance = flow.guidance_values(spec.advanced, len(indices), self.generator)
        return _Draws(indices, latents, captions, noise, sigmas, guidance, stack_references(self.references, indices))

    def _batch_loss(self, batch: list[int] | _Draws) -> torch.Tensor:
        spec = self.spec
        draws = self._draw(batch) if isinstance(batch, list) else batch
        indices = draws.indices
        latents = draws.latents.to(self.device)
        text = self.text_cache.batch(draws.captions, self.device)
        sigmas = draws.sigmas.to(self.device)
        noisy, target = flow.noisy_latents(latents, draws.noise.to(self.device), sigmas)
        guidance = None if draws.guidance is None else draws.guidance.to(self.device)
        with self._autocast():
            reference = None if draws.references is None else draws.references.to(self.device)
            prediction = self.ops.predict(self.transformer, noisy, sigmas, text, guidance, reference)
        weights = flow.loss_weights(spec.advanced, sigmas).view(-1, 1, 1, 1).to(self.device)
        prior = [spec.data.prior_loss_weight if self.items[i].is_regularisation else 1.0 for i in indices]
        weights = weights * torch.tensor(prior, device=self.device).view(-1, 1, 1, 1)
        error = weights * (prediction.float() - target.float()) ** 2
        if any(self.masks[i] is not None for i in indices):
            return self._masked_mean(error, indices)
        return error.mean()

    def _masked_mean(self, error: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Mean error over the masked-in area only; an image without a mask counts everywhere."""
        masks = torch.cat([self.masks[i] if self.masks[i] is not None else torch.ones_like(self.masks[j])
                           for i in indices for j in [next(k for k in indices if self.masks[k] is not None)]])
        masks = masks.to(error)
        return (error * masks).sum() / (masks.sum() * error.shape[1]).clamp_min(1e-8)

    def _autocast(self) -> Any:
        precision = self.spec.train.mixed_precision
        if precision == "no":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=_DTYPES[precision])

    def train(self, steps: int | None = None) -> None:
        """Train `steps` optimiser steps (default: up to max_steps), sampling and saving on the spec's intervals."""
        spec = self.spec
        end = spec.train.max_steps if steps is None else min(spec.train.max_steps, self.step + steps)
        self.emit(PhaseChanged(phase="training", detail=f"steps {self.step + 1}–{end}"))
        self.transformer.train()
        with self._token_routing():
            self._train_until(end)
        if self.cache_release.every:
            self.emit(LogMessage(level="info", message=self.cache_release.summary()))

    def _token_routing(self) -> Any:
        """TREAD around the training steps (validation switches to eval mode, which is never routed)."""
        advanced = self.spec.advanced
        if not advanced.tread:
            return contextlib.nullcontext()
        config = TreadConfig(advanced.tread_selection_ratio, advanced.tread_start_block, advanced.tread_end_block)
        return tread_routing(self.transformer, config, self.tread_generator)

    def _train_until(self, end: int) -> None:
        spec = self.spec
        started, start_step = time.perf_counter(), self.step
        while self.step < end and not self.commands.poll():  # with several processes: rank 0's decision
            step_started = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            total = self._optimizer_step_or_explain()
            # an optimiser's first step makes its state above the step's freed temporaries, which would stay
            # resident as heap holes through the later steps and sampling (fused backward trims as it steps:
            # trainer/memory/optimizer_memory.py); once per step costs well under a millisecond
            release_freed_heap()
            if self.ema is not None:
                self.ema.update(self.lora_parameters())
            self.step += 1
            self.losses.append(total)
            if self.cache_release.due(self.step):  # inside the step's timing: its cost shows in step_seconds
                self.cache_release.release()
            if self.device.type == "cuda":  # the step's backward may still run on the GPU: its time is the step's
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            rate = (self.step - start_step) / max(now - started, 1e-9)
            self.emit(Progress(step=self.step, max_steps=spec.train.max_steps, loss=total,
                               learning_rate=effective_learning_rate(self.optimizer), steps_per_second=rate,
                               eta_seconds=(spec.train.max_steps - self.step) / rate,
                               step_seconds=now - step_started, **memory_gib(self.device)))
            if spec.train.eval_every_steps and self.step % spec.train.eval_every_steps == 0:
                self.evaluate()
            every = spec.sample.every_steps
            if self.commands.take_sample_request() or (spec.sample.prompts and every and self.step % every == 0):
                self.validate()
            save_due = spec.output.save_every_steps and self.step % spec.output.save_every_steps == 0
            asked = self.commands.take_save_request()  # Save LoRA: also copied to the ComfyUI loras folder
            if asked or (save_due and self.step < end):
                self.save(intermediate=True, copy_to_comfy=asked)

    def _optimizer_step(self) -> float:
        """Forward and backward over the accumulated batches, clip, step; returns the mean loss."""
        accumulation = self.spec.train.gradient_accumulation
        fused = isinstance(self.optimizer, FusedBackward)
        if self.offloader is not None:
            self.offloader.reset()  # inputs a failed step left behind
        total = 0.0
        # Every rank draws all micro-batches of the global step (accumulation x processes) in one process's
        # order and computes its own share: the same batches, noise and timesteps as one process would use.
        draws = (self._draw(self._next_batch()) for _ in range(accumulation * self.dist.world_size))
        for micro, drawn in enumerate(self.dist.my_share(draws)):
            last = micro == accumulation - 1
            self.grad_sync.stepping = last
            if fused:  # the optimiser steps inside the last micro-batch's backward
                self.optimizer.stepping = last
            loss = self._batch_loss(drawn)
            if not math.isfinite(loss.item()):
                raise UserError(f"the loss became {loss.item()} at step {self.step + 1}, so the run stopped with "
                                "the last saved state kept; lower train.learning_rate, set train.max_grad_norm "
                                "(e.g. 1.0), or use bf16 instead of fp16")
            self.grad_scaler.scale(loss / accumulation).backward()
            total += loss.item() / accumulation
        total = self.grad_sync.average(total)  # the gradients and the loss, over the ranks
        self.grad_scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        if self.spec.train.max_grad_norm > 0 and not fused:  # fused clipped each parameter in its hook
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.spec.train.max_grad_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _optimizer_step_or_explain(self) -> float:
        """One step; out of memory saves the last completed step's state and says which setting to change."""
        before = (self.generator.get_state(), torch.get_rng_state(), [list(b) for b in self._order],
                  self.tread_generator.get_state())

        def rewind() -> None:  # back to the end of the last completed step, so the saved state resumes exactly
            self.generator.set_state(before[0])
            torch.set_rng_state(before[1])
            self._order = [list(b) for b in before[2]]
            self.tread_generator.set_state(before[3])
            self.optimizer.zero_grad(set_to_none=True)

        try:
            return self._optimizer_step()
        except torch.OutOfMemoryError:
            rewind()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            saved = ""
            if self.step > 0 and self.spec.output.save_state and self.dist.world_size == 1:  # a save is collective
                self.save(intermediate=True)
                saved = f" The state of step {self.step} is saved: fix the setting, then resume."
            raise UserError(
                f"out of memory at step {self.step + 1} ({self.plan.describe()}). Choose a stronger "
                f"lowvram.strategy (aggressive or extreme) or raise lowvram.blocks_to_swap, lower "
                f"train.batch_size ({self.spec.train.batch_size}) or data.resolution ({self.spec.data.resolution}), "
                f"or choose a smaller model.base_precision.{saved}") from None
        except Exception as exc:
            if not self._compile_fell_back(exc):
                raise
            rewind()
            return self._optimizer_step()  # the same step again, eager

    def evaluate(self) -> float:
        """Mean loss over the held-out images at fixed noise levels with fixed noise, so values compare over time."""
        if not (self.dist.is_main or self.dist.sharded):  # a whole model on rank 0 evaluates for everyone
            return 0.0
        levels = torch.tensor(_EVAL_SIGMAS)
        generator = torch.Generator("cpu").manual_seed(self.spec.train.seed)
        losses: list[float] = []
        self.transformer.eval()
        with torch.no_grad(), self._autocast():
            for index in self.eval_indices:
                latents = self.latents[index].expand(len(levels), -1, -1, -1).to(self.device)
                noise = torch.randn(latents.shape, generator=generator).to(self.device)
                noisy, target = flow.noisy_latents(latents, noise, levels.to(self.device))
                text = self.text_cache.batch([self.items[index].caption] * len(levels), self.device)
                guidance = None
                if self.flavour.guidance == "embedded":
                    guidance = torch.full((len(levels),), self.spec.advanced.guidance_value, device=self.device)
                reference = stack_references(self.references, [index] * len(levels))
                prediction = self.ops.predict(self.transformer, noisy, levels.to(self.device), text, guidance,
                                              None if reference is None else reference.to(self.device))
                losses.append(((prediction.float() - target.float()) ** 2).mean().item())
        self.transformer.train()
        loss = sum(losses) / len(losses)
        self.emit(EvalLoss(step=self.step, loss=loss))
        return loss

    # ------------------------------------------------------------------ validation and saving

    def validate(self) -> list[Path]:
        """Render every sample prompt with the current LoRA; images go to output.dir/samples."""
        try:
            return self._render_samples()
        except Exception as exc:
            if not self._compile_fell_back(exc):
                raise
            return self._render_samples()  # again with the eager blocks

    def _render_samples(self) -> list[Path]:
        sample = self.spec.sample
        steps = sample.steps or self.flavour.sample_steps
        guidance = self.flavour.sample_guidance if sample.guidance is None else sample.guidance
        resolution = sample.resolution or self.flavour.sample_resolution
        negative = self.text_cache[""] if self.flavour.guidance == "cfg" and guidance > 1.0 else None
        self.emit(PhaseChanged(phase="sampling", detail=f"{len(self.prompts)} prompts at step {self.step}"))
        self._sampled_step = self.step  # on every rank: finish() asks it
        if not self.prompts or not (self.dist.is_main or self.dist.sharded):  # FSDP: every rank takes part
            return []
        self.transformer.eval()
        self.pipe.vae.to(self.device)
        paths: list[Path] = []
        images: list[Any] = []
        previews = self._live_previews(steps)
        with (torch.no_grad(), self._autocast(), self._sampling_weights(),
              sampling_attention(self.transformer, self.spec)):
            for index, (prompt, reference) in enumerate(zip(self.prompts, self.sample_references, strict=True)):
                shown = reference_for_sampling(reference, resolution) if reference else None
                width, height = shown.size if shown is not None else (resolution, resolution)
                image = self.ops.sample(self.pipe, self.text_cache[prompt.text], negative, steps, guidance,
                                        sample.seed, resolution, shown,
                                        previews.watch(index, prompt, width, height) if previews else None)
                path = self.output_dir / "samples" / f"step{self.step:06d}_{prompt.name}.png"
                if self.dist.is_main:
                    self._write_or_explain(path.parent, lambda: write_atomic(
                        path, lambda tmp: image.save(tmp, format="PNG")))  # noqa: B023 - called at once
                paths.append(path)
                images.append(image)
                self.emit(SampleSaved(step=self.step, path=str(path), prompt=prompt.text))
                if previews:
                    previews.done(index)  # the final sample replaces them
        self._park_vae()
        if sample.clip_score_model and self.dist.is_main:
            self._score_samples(images)
        self.transformer.train()
        return paths

    def _live_previews(self, steps: int) -> LivePreviews | None:
        """sample.preview_every: this validation's live previews (rank 0 only), decoded by the VAE where it is for
        sampling, or by sample.preview_decoder's tiny autoencoder placed beside it (never moving the VAE)."""
        sample = self.spec.sample
        if not (self.dist.is_main and preview_steps(sample.preview_every, steps)):
            return None
        decoder = self.pipe.vae
        if sample.preview_decoder:
            if self._tiny_decoder is None:
                self._tiny_decoder = load_tiny_decoder(sample.preview_decoder, decoder.dtype,
                                                       self.flavour.latent_channels)
            decoder = self._tiny_decoder.to(decoder.device)
        return LivePreviews(self.ops, self.pipe, decoder, self.output_dir / "samples" / PREVIEW_FOLDER, self.emit,
                            sample.preview_every, steps, self.step, len(self.prompts))

    def _score_samples(self, images: list[Any]) -> None:
        """sample.clip_score_model: the samples' CLIPScore against their prompts, beside the evaluation loss."""
        self.emit(PhaseChanged(phase="sampling", detail=f"CLIP score of {len(images)} samples at step {self.step}"))
        scores = clip_scores(self.spec.sample.clip_score_model, images, [p.text for p in self.prompts], self.device)
        mean = sum(scores) / len(scores)
        self.emit(ClipScore(step=self.step, score=mean))
        self.emit(LogMessage(level="info", message=f"CLIP score at step {self.step}: {mean:.2f} (per prompt: "
                                                   f"{', '.join(f'{s:.1f}' for s in scores)})"))

    def _sampling_weights(self) -> Any:
        """The EMA in place of the trained weights while sampling, when sample.use_ema asks for it."""
        if self.ema is None or not self.spec.sample.use_ema:
            return contextlib.nullcontext()
        return self.ema.applied(self.lora_parameters())

    def save(self, intermediate: bool = False, copy_to_comfy: bool | None = None) -> Path:
        """Write the LoRA in every format of output.formats; intermediate saves carry the step in the file name.

        ComfyUI-layout files go to output.comfy_lora_dir too when `copy_to_comfy` (default: for the final save;
        the user's Save LoRA asks for it, interval saves do not). Returns the first format's file (the diffusers
        one when it is asked for).
        """
        spec = self.spec
        name = spec.output.name
        self.emit(PhaseChanged(phase="saving", detail=f"{name} at step {self.step} ({', '.join(spec.output.formats)})"))
        metadata = lora_metadata(spec, self.step, spec_to_toml(self.spec_as_run()))
        self._refuse_non_finite_weights()
        step = self.step if intermediate else None
        state = self.state_dict() if spec.output.save_state else None  # on every rank: it gathers their RNG
        path = self.output_dir / lora_filename(name, spec.output.formats[0], step)
        self.dist.reshard(self.transformer)
        if self.dist.is_main:  # the adapter is whole on every rank; rank 0 writes it
            needed = tensor_bytes(state) + lora_bytes(self.transformer, list(spec.output.formats))
            if state is not None:  # the state first: if the disk fills during the LoRA, the step can still resume
                self._write_or_explain(self.output_dir, lambda: save_training_state(
                    state_path(self.output_dir, self.step), state), needed)
            written = self._write_or_explain(self.output_dir, lambda: save_lora_files(
                self.transformer, type(self.pipe), self.output_dir, name, step, list(spec.output.formats),
                metadata, spec.output.comfy_lora_dir if (not intermediate if copy_to_comfy is None else copy_to_comfy)
                else ""), needed)
            path = written[spec.output.formats[0]]
            if self.ema is not None:
                self._save_ema(step, metadata)
            for key, copy in written.items():
                if key.startswith("copy:"):
                    self.emit(LogMessage(level="info", message=f"copied {copy.name} ({key.removeprefix('copy:')} "
                                         f"layout) to ComfyUI's loras folder {copy.parent}"))
            prune_checkpoints(self.output_dir, name, spec.output.keep_last)
        self.last_lora_path = path
        self.emit(LoraSaved(step=self.step, path=str(path)))
        return path

    def _repair_loras(self) -> list[str]:
        """LoRA files an interrupted save of an earlier version left without their header: repaired or removed.
        Returns what to say about them (said once the run has started)."""
        repaired, removed = repair_incomplete_loras(self.output_dir, self.spec.output.name)
        said = []
        for paths, what in ((repaired, "given back the header an interrupted save left out"),
                            (removed, "removed: an interrupted save left it without its header")):
            if paths:
                said.append(f"{', '.join(path.name for path in paths)} in {self.output_dir}: {what}")
        return said

    def _save_ema(self, step: int | None, metadata: dict[str, Any]) -> None:
        """The EMA as its own LoRA files, `<name>_ema…`, in every format of output.formats."""
        name = ema_name(self.spec.output.name)
        with self.ema.applied(self.lora_parameters()):
            self._write_or_explain(self.output_dir, lambda: save_lora_files(
                self.transformer, type(self.pipe), self.output_dir, name, step, list(self.spec.output.formats),
                {**metadata, "title": name}))
        prune_checkpoints(self.output_dir, name, self.spec.output.keep_last)

    def _refuse_non_finite_weights(self) -> None:
        """A step with a finite loss can still leave nan weights (inf gradients, no clipping): never save those over
        the good files (and prune them away). FSDP shards are not checked: reading them would gather them."""
        if self.dist.sharded:
            return
        bad = [name for name, p in self.transformer.named_parameters()
               if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise UserError(f"the LoRA weights became nan or inf by step {self.step} ({len(bad)} tensors, e.g. "
                            f"{bad[0]}), so nothing was saved and the files saved before are kept; lower "
                            "train.learning_rate, set train.max_grad_norm (e.g. 1.0), or use bf16 instead of fp16")

    def _write_or_explain(self, folder: Path, write: Callable[[], Any],  # noqa: ANN401 - write's result
                          needed: int | None = None) -> Any:  # noqa: ANN401
        """`write()`; a failed write (disk full, no permission) becomes one message naming the folder, the space
        the save needs (`needed` bytes) and what is free, and what is kept. Every write is atomic, so the files
        saved before are intact."""
        try:
            return write()
        except Exception as exc:
            if not (isinstance(exc, OSError) or disk_full(exc)):
                raise
            raise self._write_failed(folder, exc, needed) from None

    def _write_failed(self, folder: Path, exc: BaseException, needed: int | None = None,
                      doing: str = "save") -> UserError:
        """The one message for a write that failed in `folder`: why, with the space needed and free when the disk
        is full, and the saved state to resume from."""
        kept = latest_state(self.output_dir)
        resume = f"; the last saved state is {kept}: resume from it" if kept else ""
        why = disk_full_text(folder, needed) if disk_full(exc) else describe_write_error(exc)
        return UserError(f"cannot {doing} in '{folder}' at step {self.step}: {why}. The files saved before are "
                         f"intact{resume}")

    # ------------------------------------------------------------------ end

    def end(self) -> None:
        """Free everything the session holds: models, caches, optimiser state, CUDA memory."""
        if self._text_placement is not None:  # a run that stopped while caching: its layers' buffers unpinned
            self._text_placement.release()
            self._text_placement = None
        if self.swapper is not None:
            self.swapper.remove()
            self.swapper = None
        if isinstance(self.optimizer, FusedBackward):
            self.optimizer.remove()
        if self.grad_sync is not None:
            self.grad_sync.remove()
            self.grad_sync = None
        self.offloader = None
        self.pipe = self.transformer = self.optimizer = self.lr_scheduler = self._tiny_decoder = None
        self.latents = []
        self.masks = []
        self.references = []
        self.text_cache = TextEmbeddingCache()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._trackers is not None:
            self._listeners.remove(self._trackers)
            self._trackers.close()
            self._trackers = None
        if self._jsonl is not None:
            self._listeners.remove(self._jsonl)
            self._jsonl.close()
            self._jsonl = None
