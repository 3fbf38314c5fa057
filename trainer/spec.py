"""The job spec: one validated description of a training run, saved as TOML.

Sections and key names follow DESIGN.md. A value a later issue will add (another optimiser, a LoRA format,
a low-VRAM strategy) is absent from the allowed values until it works, so validation never accepts a
setting the trainer would silently ignore.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer import registry
from trainer.regular_files import NotRegularFile, read_regular

SPEC_VERSION = 1

Precision = Literal["fp32", "bf16", "fp16"]
# Storage of the frozen transformer: fp8 is e4m3 with per-row scales; int8/int4/nf4 are weight-only with bf16 compute.
BasePrecision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "nf4"]
QUANTISED_PRECISIONS = ("fp8", "int8", "int4", "nf4")
# The text encoders' storage: auto is bf16 unless the first run would not fit this machine's RAM, then int8
# (trainer/estimator/auto.py: fit_ram); a job that states a precision keeps it.
TextEncoderPrecision = Literal["auto", "fp32", "bf16", "fp16", "fp8", "int8", "int4", "nf4"]
AUTO_TEXT_ENCODER = "bf16"  # what auto holds when the RAM allows it


def text_encoder_precision(model: ModelSection, chosen: str | None = None) -> str:
    """The text encoders' concrete storage: the job's own, or for auto what the plan `chosen` (bf16 unset)."""
    if model.text_encoder_precision != "auto":
        return model.text_encoder_precision
    return chosen or AUTO_TEXT_ENCODER


def with_text_encoder_precision(spec: JobSpec, chosen: str) -> JobSpec:
    """`spec` with its text encoders' storage concrete (auto replaced by the plan's `chosen`): what the loaders,
    the embedding cache's keys and the estimate read."""
    concrete = text_encoder_precision(spec.model, chosen)
    if concrete == spec.model.text_encoder_precision:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"text_encoder_precision": concrete})})
Strategy = Literal["auto", "none", "conservative", "aggressive", "extreme"]


def modulation_format(family: str, base_precision: str, modulation_precision: str) -> str | None:
    """The format FLUX.1's in-block modulation Linears are stored in, None when they stay in the compute dtype:
    8-bit bases quantise them alike (as ComfyUI's fp8 checkpoints do), 4-bit bases to int8 unless the job asks
    for its 4-bit format (their output moves more, see bench/bench_quantized_modulation.py)."""
    if family != "flux1" or base_precision not in QUANTISED_PRECISIONS or modulation_precision == "bf16":
        return None
    if modulation_precision != "auto":
        return modulation_precision
    return base_precision if base_precision in ("fp8", "int8") else "int8"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job: the field it is about, as the job file spells it (`lora.rank`,
    `data.datasets[0].path`; "" for the whole job or file), and what is wrong and how to fix it."""

    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg

    def under(self, section: str) -> Problem:
        """The problem with its field placed under `section` (a validator of a section names its own keys)."""
        if not section:
            return self
        if not self.loc:
            return Problem(section, self.msg)
        return Problem(f"{section}{self.loc}" if self.loc.startswith("[") else f"{section}.{self.loc}", self.msg)


class Problems(ValueError):
    """What a validator raises: every problem it found, each naming its field (pydantic keeps the exception in the
    error's context, where parse_spec reads them back as they are)."""

    def __init__(self, *problems: Problem) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(map(str, self.problems)))


class SpecError(ValueError):
    """Every problem found in a spec (`errors`: field and message each), one line each when shown."""

    def __init__(self, problems: Sequence[Problem | str], source: str | None = None) -> None:
        self.errors = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__("\n".join(f"{where}{p}" for p in self.errors))

    @property
    def problems(self) -> list[str]:
        """The problems as lines: `field: message`."""
        return [str(problem) for problem in self.errors]


class _Section(BaseModel):
    # Frozen: a validated spec never changes; later code derives resolved copies (resolve_paths, model_copy).
    # allow_inf_nan=False: inf or nan in any number (lora.alpha = inf) is refused here, not at step 1.
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True, allow_inf_nan=False)


class ModelSection(_Section):
    family: Literal["flux2", "flux1"] = "flux2"
    flavour: str = "demo"
    # Hub repo id or a diffusers-layout folder; empty means the flavour's default hub repo. It always supplies the
    # tokenizers, scheduler and configs; the single files below replace only their component's weights.
    source: str = ""
    # Single .safetensors files as ComfyUI keeps them (BFL layout, fp8 included); empty = that component from
    # source. A bare file name is looked up in comfy_models_dir's folders (diffusion_models/unet, vae,
    # text_encoders/clip). text_encoder: FLUX.2 Qwen3/Mistral or FLUX.1 CLIP-L; text_encoder_2: FLUX.1 T5-XXL.
    transformer: str = ""
    vae: str = ""
    text_encoder: str = ""
    text_encoder_2: str = ""
    comfy_models_dir: str = ""  # ComfyUI's models/ folder: the UI lists its files per slot
    base_precision: BasePrecision = "bf16"
    # fp8/int8/int4/nf4: the text encoders' Linears are quantised while they stream in (embeddings stay in the
    # compute dtype); an fp8 single file loaded as fp8 keeps its stored values. auto: bf16, or int8 when the
    # first run would not fit the RAM (the plan says which; see TextEncoderPrecision).
    text_encoder_precision: TextEncoderPrecision = "auto"
    # FLUX.1's AdaLN modulation Linears (norm1.linear, norm1_context.linear, norm.linear: 27 % of the
    # transformer) under a quantised base: auto = the base's format for fp8/int8 bases, int8 for int4/nf4 bases;
    # bf16 keeps them unquantised. FLUX.2's modulation sits outside the blocks and is never quantised.
    modulation_precision: Literal["auto", "bf16", "fp8", "int8", "int4", "nf4"] = "auto"

    @model_validator(mode="after")
    def _flavour_belongs_to_family(self) -> ModelSection:
        allowed = registry.flavour_names(self.family)
        if self.flavour not in allowed:
            raise Problems(Problem("flavour", f"'{self.flavour}' is not a {self.family} flavour; allowed: "
                                              f"{', '.join(allowed)}"))
        if not self.source and registry.get_flavour(self.family, self.flavour).hub_id is None:
            raise Problems(Problem("source", "empty; the demo flavour needs the folder built by `python -m trainer "
                                             "demo`"))
        if self.text_encoder_2 and self.family == "flux2":
            raise Problems(Problem("text_encoder_2", "FLUX.2 has one text encoder (model.text_encoder); clear "
                                                     "text_encoder_2"))
        if self.modulation_precision not in ("auto", "bf16") and (
                self.family != "flux1" or self.base_precision not in QUANTISED_PRECISIONS):
            raise Problems(Problem("modulation_precision", f"'{self.modulation_precision}' quantises FLUX.1's "
                                   "modulation under a quantised model.base_precision (fp8, int8, int4, nf4); set it "
                                   "to auto or bf16 here"))
        return self


class LoraSection(_Section):
    type: Literal["lora", "lokr"] = "lora"
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    # A preset of model.family (flux2: all, attention, mlp, tiny; flux1 also mmdit, context, all+ffs,
    # context+ffs; see trainer/adapters.py) or a regex matching whole module names.
    targets: str = "all"
    # pissa and olora rewrite the frozen base at the start (the saved LoRA still applies to the original base).
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_from: str = ""  # a LoRA .safetensors to continue training from (same type, rank and targets)

    @model_validator(mode="after")
    def _init_fits_type(self) -> LoraSection:
        if self.type == "lokr" and self.init != "default":
            raise Problems(Problem("init", f"'{self.init}' applies to LoRA only; LoKr starts from 'default'"))
        if self.init_from and self.init != "default":
            raise Problems(Problem("init", f"'{self.init}' cannot be combined with init_from; use 'default'"))
        return self


class DatasetEntry(_Section):
    path: str
    # Pixel-area resolution(s) of the aspect buckets; a list trains every image at each. Unset: data.resolution.
    resolution: int | list[int] | None = None
    crop: Literal["center", "random"] = "center"  # random is drawn once per image when latents are cached
    repeats: int = Field(1, ge=1, le=10000)
    caption_strategy: Literal["textfile", "filename", "instance_prompt"] = "textfile"
    instance_prompt: str = ""
    trigger: str = ""
    # Folder of mask images named like the training images: white is learned, black is ignored by the loss.
    masks: str = ""
    # Regularisation (prior preservation) images: trained with data.prior_loss_weight to keep the base's prior.
    is_regularisation: bool = False
    # Edit pairs: a folder of reference (source) images named like the targets in `path`; the model sees the
    # reference and learns to produce the target. Only for flavours that take reference images (FLUX.1 kontext,
    # FLUX.2). Unset (None, not "") so specs without pairs save as before and old training states still resume.
    conditioning: str | None = None
    # strict (default): the reference takes exactly the target's bucket and crop (pixel-aligned edits);
    # loose: the reference is resized into its own aspect bucket at the same pixel area (other framings).
    conditioning_match: Literal["strict", "loose"] | None = None

    @model_validator(mode="after")
    def _instance_prompt_given(self) -> DatasetEntry:
        if self.caption_strategy == "instance_prompt" and not self.instance_prompt.strip():
            raise Problems(Problem("instance_prompt", "empty; caption_strategy 'instance_prompt' needs the caption "
                                                      "to use"))
        if self.conditioning is not None and not self.conditioning.strip():
            raise Problems(Problem("conditioning", "empty; give the folder of reference images or remove the key"))
        if self.conditioning_match is not None and self.conditioning is None:
            raise Problems(Problem("conditioning_match", "applies to edit pairs only; set conditioning to the "
                                                         "folder of "
                             "reference images or remove it"))
        return self

    @property
    def match(self) -> Literal["strict", "loose"]:
        """How the reference is sized and cut (conditioning_match, strict when unset)."""
        return self.conditioning_match or "strict"


class DataSection(_Section):
    datasets: list[DatasetEntry] = Field(default_factory=list)
    resolution: int | list[int] = 512  # pixel area of the buckets, e.g. 1024 or [512, 768, 1024]
    bucket_step: int = Field(64, ge=16, le=256)  # bucket sides are multiples of this (FLUX needs 16)
    max_upscale: float = Field(1.0, ge=1.0, le=8.0)  # 1.0: never enlarge; a small image trains in a smaller bucket
    min_size: int = Field(0, ge=0)  # shorter side in px below which an image is skipped; 0: the buckets decide
    # "disk" keeps them in cache_dir (default output.dir/cache), reused by later runs while inputs are unchanged.
    cache_latents: Literal["memory", "disk"] = "memory"
    cache_text_embeddings: Literal["memory", "disk"] = "memory"
    cache_dir: str = ""
    # Encode large images in overlapping tiles: caching fits a small card, latents differ slightly at tile seams.
    vae_tiling: bool = False
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    prior_loss_weight: float = Field(1.0, ge=0.0)
    # Images held out of training (taken from the end of the first dataset) for the evaluation loss.
    eval_holdout: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _some_training_data(self) -> DataSection:
        problems = []
        if self.datasets and all(entry.is_regularisation for entry in self.datasets):
            problems.append(Problem("datasets", "every dataset is marked is_regularisation; at least one must be "
                                                "the subject"))
        if self.bucket_step % 16:
            problems.append(Problem("bucket_step", f"{self.bucket_step} must be a multiple of 16 (FLUX latents are "
                                                   "8x smaller "
                            "and packed in 2x2 patches)"))
        else:
            named = [("resolution", self.resolution)] + [
                (f"datasets[{i}].resolution", e.resolution) for i, e in enumerate(self.datasets) if e.resolution]
            for field, value in named:
                for resolution in ([value] if isinstance(value, int) else value):
                    if not 64 <= resolution <= 4096 or resolution % self.bucket_step:
                        problems.append(Problem(field, f"{resolution} must be between 64 and 4096 and a "
                                                       f"multiple of bucket_step ({self.bucket_step})"))
        if problems:
            raise Problems(*problems)
        return self

    def every_resolution(self) -> list[int]:
        """The section's resolution(s) and every dataset's own: what the largest bucket is taken from."""
        values = [self.resolution] if isinstance(self.resolution, int) else list(self.resolution)
        for entry in self.datasets:
            if entry.resolution:
                values += [entry.resolution] if isinstance(entry.resolution, int) else list(entry.resolution)
        return values

    def resolutions(self, entry: DatasetEntry) -> tuple[int, ...]:
        """The resolutions one dataset trains at: its own, else the data section's."""
        value = entry.resolution or self.resolution
        return tuple(value) if isinstance(value, list) else (value,)


class TrainSection(_Section):
    max_steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: int = Field(1, ge=1, le=256)
    gradient_accumulation: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    # Lion's learning rate is usually 3-10x below AdamW's; Prodigy's is a multiplier, normally 1.0.
    optimizer: Literal["adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy"] = "adamw"
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear", "polynomial"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 turns clipping off
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    seed: int = Field(42, ge=0)
    eval_every_steps: int = Field(0, ge=0)  # 0: no evaluation loss; needs data.eval_holdout images
    # Several processes (`accelerate launch`): ddp keeps the whole frozen base on every GPU (fastest); fsdp splits
    # it over the GPUs and gathers each block just in time (for a base one GPU cannot hold; 16/32-bit bases only);
    # auto takes fsdp when the memory estimator says one GPU cannot hold the base even with everything but block
    # swap turned on. One process ignores it. See trainer/distributed.py.
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    # An exponential moving average of the LoRA weights (e.g. 0.999), saved beside the LoRA as <name>_ema; unset:
    # off. ema_device: where it is kept (gpu: fast, costs VRAM; cpu: system RAM, a copy each step). Default gpu.
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    ema_device: Literal["gpu", "cpu"] | None = None
    # Compile each transformer block with torch.compile (faster steps after a slow first one); a platform that
    # cannot compile falls back to eager with a message.
    compile: bool = False

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainSection:
        if self.scheduler != "constant" and self.warmup_steps >= self.max_steps:
            raise Problems(Problem("warmup_steps", f"{self.warmup_steps} must be below max_steps ({self.max_steps})"))
        if self.ema_device is not None and self.ema_decay is None:
            raise Problems(Problem("ema_device", "applies to the EMA only; set ema_decay (e.g. 0.999) or remove "
                                                 "ema_device"))
        return self


class LowVramSection(_Section):
    # A bundle of the settings below (see trainer/memory/strategies.py); any key set here overrides the bundle.
    # auto picks the lightest bundle the memory estimator says fits the GPU.
    strategy: Strategy = "auto"
    vram_gib: float | None = Field(None, gt=0, le=1024)  # the GPU memory auto plans for; unset: the detected GPU
    # Frozen weights of this many transformer blocks wait in CPU memory and stream to the GPU ahead of use.
    blocks_to_swap: int | None = Field(None, ge=0)
    swap_prefetch: int | None = Field(None, ge=1, le=8)  # blocks loaded ahead of the one computing
    # Pinned (page-locked) host memory makes the copies asynchronous; on some Windows systems it is slower.
    pin_memory: bool | None = None
    gradient_checkpointing: bool | None = None  # recompute block activations in backward instead of keeping them
    checkpointing_interval: int | None = Field(None, ge=1)  # checkpoint every n-th block (swapped blocks always)
    cpu_offload_checkpointing: bool | None = None  # checkpoint inputs wait in CPU memory during forward
    optimizer_offload: bool | None = None  # optimiser state and its step on the CPU
    # The optimiser steps each parameter as soon as its gradient is complete; clipping is then per parameter.
    fused_backward: bool | None = None
    # Where text encoders run while embeddings are cached: gpu, cpu, or offload (layers streamed to the GPU).
    text_encoder_device: Literal["gpu", "cpu", "offload"] | None = None
    # Where swapped blocks wait: ram (pinned host memory), or disk (a block cache file beside the latents, read
    # ahead through a small pinned staging ring: RAM holds a few blocks, not all of them).
    swap_from: Literal["ram", "disk"] | None = None
    # The disk's read speed the estimator assumes for swap_from = "disk" (GB/s); unset: 3, a typical NVMe.
    disk_read_gbps: float | None = Field(None, gt=0, le=100)
    # Hand the GPU allocator's cached, unused memory back every N steps (0: never): for a card shared with a
    # desktop. Costs a little speed (the next step allocates afresh); not part of any bundle. Unset or 0: never.
    empty_cache_every: int | None = Field(None, ge=0, le=1_000_000)


class SampleSection(_Section):
    # `<token>` in a prompt becomes the trigger word; `@name` takes the prompt called `name` from prompt_library.
    prompts: list[str] = Field(default_factory=list)
    prompt_library: str = ""  # a TOML file of `name = "prompt"` lines
    every_steps: int = Field(0, ge=0)  # 0: only at the end of the run
    # Unset values take the flavour's defaults from the registry.
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, ge=0.0, le=30.0)
    seed: int = Field(42, ge=0)
    resolution: int | None = Field(None, ge=64, le=4096)
    # Reference images for edit flavours (the pipeline's `image=`): one for every prompt, or one per prompt in
    # order. Empty: the first edit pair's reference when the data has pairs, else none.
    reference_images: list[str] = Field(default_factory=list)
    use_ema: bool | None = None  # render the samples with the EMA weights (needs train.ema_decay)
    # A transformers CLIP model (hub id or local folder) scoring each validation's samples against their prompts;
    # empty: off.
    clip_score_model: str = ""
    # Live previews while a sample renders: every N denoising steps the image so far, decoded small, goes to
    # samples/previews/ and the Run tab (trainer/previews.py); 0: off.
    preview_every: int = Field(5, ge=0, le=200)
    # What decodes the previews: empty, the model's own VAE on a downscaled latent; or a diffusers AutoencoderTiny
    # (hub id or folder) with the VAE's latent channels, e.g. madebyollin/taef1 for FLUX.1.
    preview_decoder: str = ""

    @model_validator(mode="after")
    def _one_reference_per_prompt(self) -> SampleSection:
        count = len(self.reference_images)
        if count > 1 and count != len(self.prompts):
            raise Problems(Problem("reference_images", f"{count} images for {len(self.prompts)} prompts; give one for "
                             "every prompt, or a single one used by all"))
        return self


# The longest file a name becomes is a temporary of an intermediate ComfyUI save:
# `.<name>-step10000000_comfyui.safetensors.<8 random>.tmp`, 47 bytes around the name; file systems allow 255.
MAX_NAME_BYTES = 200
_DRIVE_OR_STREAM = ":"  # `C:x` is a drive-relative path on Windows, `x:y` an NTFS alternate stream


def name_problem(name: str) -> str | None:
    """Why `name` cannot be used as a file name stem inside an output folder (None when it can)."""
    shown = repr(name if len(name) <= 60 else name[:57] + "...")
    fix = "give a plain name such as 'my_lora' (the folder goes in output.dir)"
    if any(separator in name for separator in ("/", "\\")):
        return f"{shown} holds a path separator; a name is not a path: {fix}"
    if ".." in name or name.strip(". ") == "":
        return f"{shown} holds '..' (or only dots); {fix}"
    if _DRIVE_OR_STREAM in name:
        return f"{shown} holds ':' (a drive letter on Windows); {fix}"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return f"{shown} holds a control character (a line break, tab or NUL); {fix}"
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > MAX_NAME_BYTES:
        return (f"{shown} is {size} bytes long; file names derived from it must fit the file system, so keep it "
                f"to {MAX_NAME_BYTES} bytes")
    return None


class OutputSection(_Section):
    dir: str = "output"
    # The stem of every file the run writes (LoRAs, copies, the saved job): a name, never a path.
    name: str = Field("lora", min_length=1)
    save_every_steps: int = Field(0, ge=0)  # 0: only at the end of the run
    keep_last: int = Field(3, ge=1)  # intermediate LoRAs and training states kept on disk
    # Training state (optimiser, scheduler, RNG, data order) beside each save, for an exact resume.
    save_state: bool = True
    # diffusers (`transformer.` keys), comfyui (BFL names, fused qkv/linear1), kohya (FLUX.1 only).
    formats: list[Literal["diffusers", "comfyui", "kohya"]] = Field(default_factory=lambda: ["diffusers"],
                                                                     min_length=1)
    comfy_lora_dir: str = ""  # ComfyUI's models/loras: the final (and Save LoRA's) comfyui/kohya files are copied there
    log_with: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)  # logs go to output.dir/logs

    @field_validator("name")
    @classmethod
    def _name_is_a_name(cls, name: str) -> str:
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        return name


class AdvancedSection(_Section):
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    shift: float = Field(1.0, gt=0)
    # Resolution-dependent shift as the flavour's scheduler computes it; overrides `shift` when on.
    auto_shift: bool = True
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    # Noise levels are drawn, shifted, then mapped into [min_timestep, max_timestep] / 1000.
    min_timestep: int = Field(0, ge=0, le=1000)
    max_timestep: int = Field(1000, ge=0, le=1000)
    # Guidance-distilled flavours (FLUX.1 dev, krea, kontext; FLUX.2 dev) see this guidance value while training.
    guidance_mode: Literal["constant", "random"] = "constant"
    guidance_value: float = Field(1.0, ge=0.0, le=30.0)
    guidance_min: float = Field(1.0, ge=0.0, le=30.0)
    guidance_max: float = Field(4.0, ge=0.0, le=30.0)
    # TREAD: a random share of image tokens skips the blocks start..end (negative counts from the end).
    tread: bool = False
    tread_selection_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    tread_start_block: int = 2
    tread_end_block: int = -2
    # The attention kernel (trainer/attention.py): sdpa (torch's), flash (flash-attn), sage (SageAttention: samples
    # only, training keeps sdpa) or xformers; each needs its package and a CUDA GPU that supports it.
    attention: Literal["sdpa", "flash", "sage", "xformers"] = "sdpa"

    @model_validator(mode="after")
    def _ranges_ordered(self) -> AdvancedSection:
        if self.min_timestep >= self.max_timestep:
            raise Problems(Problem("min_timestep", f"{self.min_timestep} must be below max_timestep "
                                                   f"({self.max_timestep})"))
        if self.guidance_mode == "random" and self.guidance_min > self.guidance_max:
            raise Problems(Problem("guidance_min", f"{self.guidance_min} is above guidance_max ({self.guidance_max})"))
        return self


# The training guidance a guidance-distilled transformer is fed (advanced.*); the others have no input for it.
TRAINING_GUIDANCE_KEYS = ("guidance_mode", "guidance_value", "guidance_min", "guidance_max")


def _guidance_agrees(spec: JobSpec) -> list[Problem]:
    """Training guidance set (not left at its default) on a flavour without a guidance embedding would be ignored:
    validation never accepts what training would ignore."""
    flavour = registry.get_flavour(spec.model.family, spec.model.flavour)
    if flavour.guidance == "embedded":
        return []
    fields = AdvancedSection.model_fields
    changed = [key for key in TRAINING_GUIDANCE_KEYS if getattr(spec.advanced, key) != fields[key].default]
    if not changed:
        return []
    keys = ", ".join(f"advanced.{key}" for key in changed)
    return [Problem(keys, f"{flavour.label} ({spec.model.family} {spec.model.flavour}) has no guidance embedding, "
                    "so training guidance would be ignored; remove these keys, or choose a flavour with one "
                    "(FLUX.1 dev, krea or kontext, FLUX.2 dev)")]


class JobSpec(_Section):
    spec_version: Literal[1] = SPEC_VERSION  # a newer file is refused rather than half-understood
    model: ModelSection  # required: which model to train is never guessed
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    lowvram: LowVramSection = Field(default_factory=LowVramSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    output: OutputSection = Field(default_factory=OutputSection)
    advanced: AdvancedSection = Field(default_factory=AdvancedSection)

    @model_validator(mode="after")
    def _sections_agree(self) -> JobSpec:
        from trainer.adapters import TARGET_PRESETS
        from trainer.tread import TreadConfig, validate_tread

        problems: list[Problem] = []
        if self.train.eval_every_steps and not self.data.eval_holdout:
            problems.append(Problem("train.eval_every_steps", "the evaluation loss needs held-out images; "
                            "set data.eval_holdout to 1 or more"))
        targets, family = self.lora.targets, self.model.family
        other_presets = {p for f, presets in TARGET_PRESETS.items() if f != family for p in presets}
        if targets in other_presets - set(TARGET_PRESETS[family]):
            problems.append(Problem("lora.targets", f"'{targets}' is not a {family} preset; "
                            f"allowed: {', '.join(TARGET_PRESETS[family])} or a module-name regex"))
        elif targets not in TARGET_PRESETS[family]:
            try:
                re.compile(targets)
            except re.error as exc:
                problems.append(Problem("lora.targets", f"'{targets}' is neither a preset nor a valid regex ({exc})"))
        if "kohya" in self.output.formats and family != "flux1":
            problems.append(Problem("output.formats", "'kohya' is a FLUX.1 layout; for FLUX.2 use 'comfyui' or "
                                                      "'diffusers'"))
        if self.lora.type == "lokr" and set(self.output.formats) - {"diffusers"}:
            problems.append(Problem("output.formats", "LoKr is written in the diffusers format only; remove "
                                                      "comfyui/kohya"))
        elif self.lora.type == "lokr" and self.output.comfy_lora_dir:
            problems.append(Problem("output.comfy_lora_dir", "LoKr is written in the diffusers format only, which "
                                    "is not ComfyUI's layout, so nothing could be copied there; leave it empty or "
                                    "train a LoRA (lora.type = lora)"))
        problems += _guidance_agrees(self)
        problems += _lowvram_agrees(self)
        if self.sample.use_ema and self.train.ema_decay is None:
            problems.append(Problem("sample.use_ema", "there is no EMA to sample with; set train.ema_decay (e.g. "
                                                      "0.999) or turn use_ema off"))
        problems += _references_agree(self)
        if self.advanced.tread:
            a = self.advanced
            blocks = registry.get_flavour(family, self.model.flavour).total_blocks
            config = TreadConfig(a.tread_selection_ratio, a.tread_start_block, a.tread_end_block)
            problems += [Problem(key, message) for key, message in validate_tread(config, blocks)]
        if problems:
            raise Problems(*problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _references_agree(spec: JobSpec) -> list[Problem]:
    """Edit pairs and sample references only for flavours whose pipeline takes a reference image."""
    flavour = registry.get_flavour(spec.model.family, spec.model.flavour)
    if flavour.reference_images:
        return []
    keys = [f"data.datasets[{i}].conditioning" for i, e in enumerate(spec.data.datasets) if e.conditioning]
    keys += ["sample.reference_images"] if spec.sample.reference_images else []
    return [Problem(key, f"{flavour.label} ({spec.model.family} {flavour.name}) takes no reference image; edit "
                         "pairs train FLUX.1 kontext or a FLUX.2 flavour. Remove the key or choose one of those")
            for key in keys]


def _lowvram_agrees(spec: JobSpec) -> list[Problem]:
    """Explicit low-VRAM settings that contradict each other or the model; bundles are checked when resolved."""
    low, problems = spec.lowvram, []
    most = registry.get_flavour(spec.model.family, spec.model.flavour).max_blocks_to_swap
    if low.blocks_to_swap is not None and low.blocks_to_swap > most:
        problems.append(Problem("lowvram.blocks_to_swap", f"{low.blocks_to_swap} is above {most}, the most this "
                                                          "flavour "
                        "allows (two blocks stay on the GPU)"))
    if low.gradient_checkpointing is False:
        if low.blocks_to_swap:
            problems.append(Problem("lowvram.blocks_to_swap", "swapped blocks need gradient_checkpointing; turn it "
                                                              "on or "
                            "set blocks_to_swap = 0"))
        if low.cpu_offload_checkpointing:
            problems.append(Problem("lowvram.cpu_offload_checkpointing", "offloads checkpoint inputs, so it needs "
                            "gradient_checkpointing = true"))
    if low.cpu_offload_checkpointing and spec.advanced.tread:
        problems.append(Problem("lowvram.cpu_offload_checkpointing", "cannot be combined with advanced.tread (the "
                                                                     "routed "
                        "tokens bypass the offloaded blocks); turn one of them off"))
    if low.swap_from == "disk" and spec.lora.init in ("pissa", "olora"):
        problems.append(Problem("lowvram.swap_from", f"blocks on disk are written once and never rewritten, but "
                                f"lora.init '{spec.lora.init}' rewrites the base weights; use lora.init 'default' or "
                                "swap_from 'ram'"))
    if low.optimizer_offload and spec.train.mixed_precision == "fp16":
        problems.append(Problem("lowvram.optimizer_offload", "fp16 loss scaling needs the optimiser beside the "
                                                             "gradients; use "
                        'train.mixed_precision = "bf16" or turn optimizer_offload off'))
    if low.fused_backward:
        if spec.train.mixed_precision == "fp16":
            problems.append(Problem("lowvram.fused_backward", "cannot unscale fp16 gradients per parameter; use "
                            'train.mixed_precision = "bf16" or turn fused_backward off'))
        if spec.train.optimizer == "prodigy":
            problems.append(Problem("lowvram.fused_backward", "Prodigy adapts one step size over all parameters; use "
                            "another optimizer or turn fused_backward off"))
    return problems


# ---------------------------------------------------------------- parsing and error messages


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at the place an unknown key was found, following the error's location."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        current = args[0] if args else annotation
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
    return list(current.model_fields)


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(error: dict[str, Any]) -> list[Problem]:
    """pydantic's error as Problems: a validator's own (in the error's context) placed under its location, else
    one in the user's words."""
    loc = tuple(p for p in error["loc"] if p not in ("function-after",))
    field = _format_loc(loc)
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, Problems):
        return [problem.under(field) for problem in raised.problems]
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(JobSpec, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(allowed)}"
        return [Problem(field, f"unknown key; {hint}")]
    if kind == "missing":
        return [Problem(field, "required but missing")]
    if kind == "model_type":  # pydantic names the class ("instance of TrainSection"); users write TOML tables
        table = f"[[{field[:field.rindex('[')]}]]" if field.endswith("]") else f"[{field}]"
        return [Problem(field, f"should be a table of settings ({table} in TOML), not a single value "
                               f"(got {error['input']!r})")]
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) or kind == "value_error" else f" (got {got!r})"
    return [Problem(field, f"{message}{shown}")]


def parse_spec(data: dict[str, Any], source: str | None = None) -> JobSpec:
    """Validate a plain dict; every problem is reported at once in one SpecError."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([problem for error in exc.errors() for problem in _describe(error)], source) from None


# The deepest a job goes: the document, [data], its [[data.datasets]] array, one dataset, its resolution list.
MAX_NESTING = 8
MAX_JOB_BYTES = 16 * 1024 * 1024  # far above any job (a few kB); a bigger file is not one


def read_job_text(path: str | Path) -> str:
    """A job file's text; SpecError when it is missing, not a regular file (a FIFO would block a plain read
    forever), too big, unreadable or not UTF-8."""
    path = Path(path)
    try:
        data = read_regular(path, MAX_JOB_BYTES)
    except FileNotFoundError:
        raise SpecError(["file not found; give the path of a job TOML (make one with `python -m trainer demo`)"],
                        str(path)) from None
    except NotRegularFile as exc:
        problem = "cannot read the file: Is a directory" if exc.folder else str(exc)
        raise SpecError([f"{problem}; give the path of a job TOML"], str(path)) from None
    except OSError as exc:
        raise SpecError([f"cannot read the file: {exc.strerror}"], str(path)) from None
    if data is None:
        raise SpecError([f"is larger than {MAX_JOB_BYTES // 2**20} MB; a job TOML is a few kB"], str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(["not a text file (UTF-8); give the path of a job TOML"], str(path)) from None


def _nesting(data: Any) -> int:  # noqa: ANN401 - parsed TOML
    """How deep tables and arrays nest in `data` (a plain value: 0), counted without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:  # deeper than that is refused anyway: no need to walk it all
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_toml(text: str, source: str | None = None) -> dict[str, Any]:
    """A job's TOML as a dict; SpecError when it is not TOML or nests deeper than any job (which would reach
    Python's recursion limit in the parser or the validation)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([f"not valid TOML: {exc}"], source) from None
    except RecursionError:
        data = None
    if data is None or _nesting(data) > MAX_NESTING:
        raise SpecError([f"tables and arrays nest deeper than {MAX_NESTING} levels; no job needs more than 5 (the "
                         "deepest is data.datasets[i].resolution): check the brackets"], source)
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> JobSpec:
    """The job file at `path`, over `base` (a preset's partial job: the file's own values win), then `overrides`."""
    path = Path(path)
    data = parse_toml(read_job_text(path), str(path))
    if base:
        data = deep_merge(base, data)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_spec(data, str(path))


def spec_to_toml(spec: JobSpec) -> str:
    return tomli_w.dumps(spec.to_dict())


def save_spec(spec: JobSpec, path: str | Path) -> None:
    from trainer.files import write_text_atomic  # local import keeps this module's import graph tiny

    write_text_atomic(Path(path), spec_to_toml(spec))


# ---------------------------------------------------------------- overrides and merging


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` with a TOML literal value; a bare word is taken as a string."""
    key, sep, raw = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not sep or not all(parts):
        raise SpecError([f"--set {item!r}: expected section.key=value, e.g. lora.rank=16"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        value = None
    if value is None or _nesting(value) >= MAX_NESTING:
        raise SpecError([f"--set {key.strip()}: its value nests deeper than any job needs; check the brackets"])
    return parts, value


_INDEXED = re.compile(r"^(\w+)\[(\d+)\]$")


def _child(node: dict[str, Any], part: str, item: str) -> dict[str, Any]:
    """The table at `part` of `node`, created if missing; `name[i]` picks entry i of an array of tables."""
    indexed = _INDEXED.match(part)
    if indexed:
        entries = node.get(indexed.group(1))
        index = int(indexed.group(2))
        if not isinstance(entries, list) or index >= len(entries) or not isinstance(entries[index], dict):
            count = len(entries) if isinstance(entries, list) else 0
            raise SpecError([f"--set {item!r}: '{indexed.group(1)}' has {count} entries; no entry {index}"])
        return entries[index]
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
        raise SpecError([f"--set {item!r}: '{part}' is a value, not a section"])
    return child


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` overrides; `data.datasets[0].trigger=x` reaches into an array of tables."""
    result = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = result
        for part in parts[:-1]:
            node = _child(node, part, item)
        node[parts[-1]] = value
    return result


def deep_merge(base: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; tables merge key by key, everything else (lists included) is replaced."""
    result = {k: (deep_merge({}, v) if isinstance(v, dict) else v) for k, v in base.items()}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = deep_merge(result[key], value)
            elif isinstance(value, dict):
                result[key] = deep_merge({}, value)
            else:
                result[key] = value
    return result


# ---------------------------------------------------------------- paths


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def is_local_path(source: str) -> bool:
    """A hub id is `owner/name`; anything that exists, or looks like a filesystem path, is local."""
    if not source:
        return False
    if Path(source).expanduser().exists():
        return True
    return source.startswith((".", "/", "~", "\\")) or ":" in source or source.count("/") != 1


def resolve_paths(spec: JobSpec, base_dir: str | Path) -> JobSpec:
    """A copy whose relative paths are taken from `base_dir` (the job file's folder)."""
    base = Path(base_dir)
    data = spec.to_dict()
    if is_local_path(spec.model.source):
        data["model"]["source"] = _resolve(spec.model.source, base)
    from trainer.sources import resolve_model_paths  # torch-free; imported here as it imports this module

    data["model"] = resolve_model_paths(data["model"], base)
    for entry in data["data"]["datasets"]:
        entry["path"] = _resolve(entry["path"], base)
        for key in ("masks", "conditioning"):
            if entry.get(key):
                entry[key] = _resolve(entry[key], base)
    data["sample"]["reference_images"] = [_resolve(p, base) for p in spec.sample.reference_images]
    if spec.data.cache_dir:
        data["data"]["cache_dir"] = _resolve(spec.data.cache_dir, base)
    if is_local_path(spec.sample.clip_score_model):
        data["sample"]["clip_score_model"] = _resolve(spec.sample.clip_score_model, base)
    if is_local_path(spec.sample.preview_decoder):
        data["sample"]["preview_decoder"] = _resolve(spec.sample.preview_decoder, base)
    if spec.sample.prompt_library:
        data["sample"]["prompt_library"] = _resolve(spec.sample.prompt_library, base)
    data["output"]["dir"] = _resolve(spec.output.dir, base)
    if spec.output.comfy_lora_dir:
        data["output"]["comfy_lora_dir"] = _resolve(spec.output.comfy_lora_dir, base)
    if spec.lora.init_from:
        data["lora"]["init_from"] = _resolve(spec.lora.init_from, base)
    return JobSpec.model_validate(data)
