"""The embedded default: tiny FLUX-shaped pipelines with random weights and a small generated dataset.

Everything is built offline from the real diffusers and transformers classes, so a new user can train
before downloading anything and every test runs on the same code path as a real model.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from pathlib import Path

from trainer.events import Event, LogMessage, PhaseChanged, RunFinished
from trainer.files import write_text_atomic

DEMO_SEED = 0
DEMO_IMAGE_SIZE = 64

# Shapes that keep a training step near 0.02 s on two CPU cores (DESIGN.md).
_HEAD_DIM = 16
_HEADS = 2
_TEXT_HIDDEN = 16
_TEXT_LAYERS = 3
_VAE_CHANNELS = (8, 8, 8, 8)  # four blocks: x8 downscale

_COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle", "diamond")


def _byte_level_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _qwen_tokenizer():  # noqa: ANN202 - transformers type
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_level_alphabet())}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    # The FLUX.2 klein pipeline renders prompts through the chat template, as Qwen3 does.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def _clip_tokenizer():  # noqa: ANN202
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"{c}</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():  # noqa: ANN202
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789▁.,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_flux2_demo(out_dir: Path) -> Path:
    """A FLUX.2 [klein]-shaped pipeline (Flux2KleinPipeline) saved in diffusers folder layout."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(DEMO_SEED)
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=32,
        num_hidden_layers=_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=512, tie_word_embeddings=True,
    ))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=2, num_single_layers=2,
        attention_head_dim=_HEAD_DIM, num_attention_heads=_HEADS,
        joint_attention_dim=_TEXT_HIDDEN * 3,  # three stacked hidden-state layers
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=_VAE_CHANNELS, layers_per_block=1, latent_channels=32, norm_num_groups=4,
        sample_size=DEMO_IMAGE_SIZE,
    )
    # A trained VAE has BatchNorm statistics of its latents; give ours non-trivial ones so the code path is real.
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.1, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=False,
    )
    target = out_dir / "flux2"
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def build_flux1_demo(out_dir: Path) -> Path:
    """A FLUX.1 [dev]-shaped pipeline (FluxPipeline: CLIP + T5, guidance embedding) in diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(DEMO_SEED)
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    hidden = _HEAD_DIM * _HEADS
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=hidden, intermediate_size=64, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=hidden, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
        attention_head_dim=_HEAD_DIM, num_attention_heads=_HEADS, joint_attention_dim=hidden,
        pooled_projection_dim=hidden, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=_VAE_CHANNELS, layers_per_block=1, latent_channels=16, norm_num_groups=4,
        sample_size=DEMO_IMAGE_SIZE, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    target = out_dir / "flux1"
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:  # noqa: ANN001
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def build_demo_dataset(out_dir: Path, count: int = 12, size: int = DEMO_IMAGE_SIZE) -> Path:
    """Generated images of coloured shapes, each with a caption .txt sidecar."""
    from PIL import Image, ImageDraw

    rng = random.Random(DEMO_SEED)
    target = out_dir / "dataset"
    target.mkdir(parents=True, exist_ok=True)
    names = list(_COLOURS)
    for index in range(count):
        shape = _SHAPES[index % len(_SHAPES)]
        fg, bg = rng.sample(names, 2)
        image = Image.new("RGB", (size, size), _COLOURS[bg])
        margin = rng.randint(size // 8, size // 4)
        _draw_shape(ImageDraw.Draw(image), shape, (margin, margin, size - margin, size - margin), _COLOURS[fg])
        stem = f"shape_{index:02d}"
        image.save(target / f"{stem}.png")
        (target / f"{stem}.txt").write_text(f"a {fg} {shape} on a {bg} background", encoding="utf-8")
    return target


def build_edit_dataset(out_dir: Path, count: int = 8, size: int = DEMO_IMAGE_SIZE) -> tuple[Path, Path]:
    """Edit pairs: `dataset_edit/` holds the targets (a shape recoloured), `dataset_edit_ref/` the references (the
    same shape in its original colour), named alike; each target's caption is the instruction."""
    from PIL import Image, ImageDraw

    rng = random.Random(DEMO_SEED + 1)
    targets, references = out_dir / "dataset_edit", out_dir / "dataset_edit_ref"
    targets.mkdir(parents=True, exist_ok=True)
    references.mkdir(parents=True, exist_ok=True)
    names = list(_COLOURS)
    for index in range(count):
        shape = _SHAPES[index % len(_SHAPES)]
        before, after, bg = rng.sample(names, 3)
        margin = rng.randint(size // 8, size // 4)
        box = (margin, margin, size - margin, size - margin)
        stem = f"edit_{index:02d}"
        for folder, colour in ((references, before), (targets, after)):
            image = Image.new("RGB", (size, size), _COLOURS[bg])
            _draw_shape(ImageDraw.Draw(image), shape, box, _COLOURS[colour])
            image.save(folder / f"{stem}.png")
        (targets / f"{stem}.txt").write_text(f"make the {shape} {after}", encoding="utf-8")
    return targets, references


def edit_job_toml() -> str:
    """The FLUX.2 demo trained on edit pairs (klein takes reference images, so the demo flavour does too)."""
    return f"""\
# Edit-pair demo: the tiny random FLUX.2 model learns to turn each reference image into its target.
# Targets are in dataset_edit/, their references (same file names) in dataset_edit_ref/.
spec_version = 1

[model]
family = "flux2"
flavour = "demo"
source = "flux2"
base_precision = "fp32"
text_encoder_precision = "fp32"

[lora]
rank = 4
alpha = 4.0

[[data.datasets]]
path = "dataset_edit"
conditioning = "dataset_edit_ref"
conditioning_match = "strict"    # the pairs are pixel-aligned; "loose" lets a reference keep its own framing

[data]
resolution = {DEMO_IMAGE_SIZE}

[train]
max_steps = 60
batch_size = 2
learning_rate = 0.005
mixed_precision = "no"
seed = 42

[sample]
# No reference_images: every prompt is rendered from the first pair's reference image.
prompts = ["make the circle red", "make the square blue"]
every_steps = 20

[output]
dir = "output_edit"
name = "demo_edit_lora"
"""


def demo_job_toml(family: str = "flux2") -> str:
    """The job that trains a LoRA on the demo dataset; paths are relative to the job file's folder."""
    return f"""\
# Demo job: trains a LoRA on the tiny random {family} model built by `python -m trainer demo`.
# Relative paths are taken from this file's folder.
spec_version = 1

[model]
family = "{family}"
flavour = "demo"
source = "{family}"
base_precision = "fp32"          # the demo runs on any CPU; real models train in bf16 or lower
text_encoder_precision = "fp32"

[lora]
rank = 4
alpha = 4.0

[[data.datasets]]
path = "dataset"
trigger = "shapez"

[data]
resolution = {DEMO_IMAGE_SIZE}

[train]
max_steps = 60
batch_size = 2
learning_rate = 0.005            # a tiny random model needs a large step to show a change
mixed_precision = "no"
seed = 42

[sample]
prompts = ["shapez a red circle on a blue background", "shapez a yellow square on a black background"]
every_steps = 20

[output]
dir = "output"
name = "demo_lora"
"""


FAMILIES = ("flux2", "flux1")


def build_demo(out_dir: str | Path, families: tuple[str, ...] = FAMILIES) -> Path:
    """Build the demo pipelines, dataset and job.toml under `out_dir`; returns the job file's path."""
    from trainer.quiet import disable_loading_bars

    disable_loading_bars()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if "flux2" in families:
        build_flux2_demo(out)
    if "flux1" in families:
        build_flux1_demo(out)
        write_text_atomic(out / "job_flux1.toml", demo_job_toml("flux1"))
    build_demo_dataset(out)
    if "flux2" in families:
        build_edit_dataset(out)
        write_text_atomic(out / "job_edit.toml", edit_job_toml())
    job = out / "job.toml"
    write_text_atomic(job, demo_job_toml("flux2" if "flux2" in families else "flux1"))
    return job


def is_demo_folder(path: str | Path) -> bool:
    return (Path(path) / "job.toml").is_file() and (Path(path) / "dataset").is_dir()


def ensure_demo(out_dir: str | Path, emit: Callable[[Event], None] | None = None) -> Path:
    """Build the demo under `out_dir` unless a complete one is already there; returns the job file."""
    out = Path(out_dir)
    complete = (is_demo_folder(out) and (out / "job_edit.toml").is_file()
                and all((out / family / "model_index.json").is_file() for family in FAMILIES))
    if not complete:
        if emit is not None:
            emit(PhaseChanged(phase="building demo", detail=str(out)))
        build_demo(out)
    return out / "job.toml"


def prepare_demo(demo_dir: Path | None, emit: Callable[[Event], None]) -> bool:
    """Build the demo in `demo_dir` when it is missing, as a run starts (None: nothing to build); False, with a
    failed RunFinished emitted, when that fails. Both kinds of run in the app call this first."""
    if demo_dir is None:
        return True
    try:
        ensure_demo(demo_dir, emit)
    except Exception as exc:  # noqa: BLE001 - the app must survive anything the trainer does
        emit(LogMessage(level="error", message=traceback.format_exc()))
        emit(RunFinished(status="failed", step=0, message=f"building the demo failed: {exc}"))
        return False
    return True
