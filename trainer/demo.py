"""The embedded default: tiny FLUX-shaped pipelines and a small generated dataset of coloured shapes.

Everything is built offline from the real diffusers and transformers classes, so a new user can train before
downloading anything and every test runs on the same code path as a real model. The tiny VAE and transformer are
pre-trained briefly at build time (trainer/demo_pretrain.py), so a LoRA trained on the dataset visibly learns it.
A build is stamped with a key of everything it depends on; a later build with the same key reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.demo_shapes import (
    COLOURS,
    DEMO_IMAGE_SIZE,
    DEMO_SEED,
    SHAPES,
    TRIGGER,
    draw_shape,
    new_combination,
    training_pictures,
    write_dataset,
)
from trainer.events import Event, LogMessage, PhaseChanged, RunFinished
from trainer.files import write_text_atomic

# The transformers are 128 wide: at least as wide as a FLUX.2 latent token (32 channels x 2x2), or the flow they
# predict cannot reach every latent direction and sampling leaves noise behind. Still ~0.03 s a step on a CPU.
_HEAD_DIM = 32
_HEADS = 4
_TEXT_HIDDEN = 16
_TEXT_LAYERS = 3
_CLIP_T5_HIDDEN = 32
# Four blocks: x8 downscale. One norm group: a group's mean is removed, so with more groups a flat colour is lost.
_VAE_CHANNELS = (8, 8, 8, 8)
_VAE_GROUPS = 1
STAMP = "demo.json"
CACHE_ENV = "FLUX_LORA_STUDIO_DEMO_CACHE"
# The demo job: a LoRA that learns the dataset within a minute on two CPU cores (tests/test_demo_learning.py).
DEMO_STEPS = 1000
DEMO_RANK = 8
DEMO_LEARNING_RATE = 0.005
SAMPLED_CAPTIONS = 3
_SOURCES = ("demo.py", "demo_shapes.py", "demo_pretrain.py")


def _byte_level_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _demo_words() -> list[str]:
    """Every word of the demo's captions and instructions, which its tokenizers keep whole."""
    return [TRIGGER, "a", "on", "background", "make", "the", *COLOURS, *SHAPES]


def _word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges that build each word (and its space-led form, "Ġword") one character at a time, so a
    demo caption takes a token a word; any other text still falls back to bytes. The space-led chains rank first: Ġ
    only starts a piece, so no other merge can split a space-led word."""
    chains = []
    for word in words:
        for form in ("Ġ" + word, word):
            chains += [(form[0] != "Ġ", i, (form[:i], form[i])) for i in range(1, len(form))]
    merges: list[tuple[str, str]] = []
    for _, _, merge in sorted(chains):
        if merge not in merges:
            merges.append(merge)
    return merges


def _qwen_tokenizer():  # noqa: ANN202 - transformers type
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_level_alphabet())}
    merges = _word_merges(_demo_words())
    for token in [a + b for a, b in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    # The FLUX.2 klein pipeline renders prompts through the chat template, as Qwen3 does; the demo's keeps only the
    # markers around the prompt, so a caption fits its few tokens.
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
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
    # Whole demo words score above their letters (-1 each), so the unigram model takes a caption a word a token.
    pieces += [("▁" + word, 0.0) for word in _demo_words()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _flux2_pipeline():  # noqa: ANN202 - a Flux2KleinPipeline
    """A FLUX.2 [klein]-shaped pipeline (Flux2KleinPipeline) with random weights."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

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
        timestep_guidance_channels=32, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=_VAE_CHANNELS, layers_per_block=1, latent_channels=32, norm_num_groups=_VAE_GROUPS,
        sample_size=DEMO_IMAGE_SIZE,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=False,
    )


def _flux1_pipeline():  # noqa: ANN202 - a FluxPipeline
    """A FLUX.1 [dev]-shaped pipeline (FluxPipeline: CLIP + T5, guidance embedding) with random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    text = _CLIP_T5_HIDDEN
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=text, intermediate_size=64, projection_dim=text,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=text, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
        attention_head_dim=_HEAD_DIM, num_attention_heads=_HEADS, joint_attention_dim=text,
        pooled_projection_dim=text, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=_VAE_CHANNELS, layers_per_block=1, latent_channels=16, norm_num_groups=_VAE_GROUPS,
        sample_size=DEMO_IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False,
    )
    from trainer.families.flux1 import DEMO_SHIFT_LINE

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **DEMO_SHIFT_LINE)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )


_PIPELINES = {"flux2": _flux2_pipeline, "flux1": _flux1_pipeline}


def build_family_demo(out_dir: Path, family: str, report: Callable[[str], None] = lambda _: None,
                      flux2_vae: Any = None) -> Any:  # noqa: ANN401
    """The family's tiny pipeline, pre-trained on demo pictures, saved in diffusers folder layout under
    `out_dir/family`; returns the pipeline. `flux2_vae`: the FLUX.1 VAE starts from this trained one."""
    import torch

    from trainer.demo_pretrain import pretrain

    torch.manual_seed(DEMO_SEED)
    pipe = _PIPELINES[family]()
    pretrain(pipe, family, DEMO_SEED, report, flux2_vae)
    pipe.save_pretrained(out_dir / family, safe_serialization=True)
    return pipe


def build_demo_dataset(out_dir: Path, count: int = 12, size: int = DEMO_IMAGE_SIZE) -> Path:
    """Generated images of coloured shapes, each with a caption .txt sidecar."""
    return write_dataset(out_dir / "dataset", training_pictures(count), size)


def build_edit_dataset(out_dir: Path, count: int = 8, size: int = DEMO_IMAGE_SIZE) -> tuple[Path, Path]:
    """Edit pairs: `dataset_edit/` holds the targets (a shape recoloured), `dataset_edit_ref/` the references (the
    same shape in its original colour), named alike; each target's caption is the instruction."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(DEMO_SEED + 1)
    targets, references = out_dir / "dataset_edit", out_dir / "dataset_edit_ref"
    targets.mkdir(parents=True, exist_ok=True)
    references.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        before, after, bg = rng.sample(names, 3)
        margin = rng.randint(size // 8, size // 4)
        box = (margin, margin, size - margin, size - margin)
        stem = f"edit_{index:02d}"
        for folder, colour in ((references, before), (targets, after)):
            image = Image.new("RGB", (size, size), COLOURS[bg])
            draw_shape(ImageDraw.Draw(image), shape, box, COLOURS[colour])
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


def sample_prompts() -> list[str]:
    """What the demo job samples: training captions, so the user sees them converge, and one new combination."""
    pictures = training_pictures()
    chosen = [*pictures[:SAMPLED_CAPTIONS], new_combination(pictures)]
    return [f"{TRIGGER} {picture.caption}" for picture in chosen]


# The tiny FLUX.1 base reads its captions mostly from CLIP's pooled vector, which enters every block through
# time_text_embed and the modulation, layers the presets leave alone: with a preset only, the LoRA cannot teach it new
# words (measured: every prompt's sample alike, 0.75 of the step-0 error after the demo run). With time_text_embed
# beside the preset's layers: 0.41 and 0.26 (bench/bench_demo_learning.py, on the 64-token build of 600 steps).
# Pre-training it to read the T5 tokens instead made it worse (1.06).
FLUX1_DEMO_TARGETS = r"((single_)?transformer_blocks\.\d+\.(?!(.*\.)?norm).+|time_text_embed\..+)"


def _demo_targets(family: str) -> str:
    if family != "flux1":
        return ""
    return f"\ntargets = '{FLUX1_DEMO_TARGETS}'   # the preset's layers and the pooled text's (trainer/demo.py)"


def demo_job_toml(family: str = "flux2") -> str:
    """The job that trains a LoRA on the demo dataset; paths are relative to the job file's folder."""
    prompts = ", ".join(f'"{prompt}"' for prompt in sample_prompts())
    return f"""\
# Demo job: trains a LoRA on the tiny {family} model built by `python -m trainer demo` (pre-trained to draw
# coloured shapes, not which ones a caption names: that is what the LoRA learns). Relative paths are taken
# from this file's folder.
spec_version = 1

[model]
family = "{family}"
flavour = "demo"
source = "{family}"
base_precision = "fp32"          # the demo runs on any CPU; real models train in bf16 or lower
text_encoder_precision = "fp32"

[lora]
rank = {DEMO_RANK}
alpha = {float(DEMO_RANK)}{_demo_targets(family)}

[[data.datasets]]
path = "dataset"
trigger = "{TRIGGER}"

[data]
resolution = {DEMO_IMAGE_SIZE}

[train]
max_steps = {DEMO_STEPS}
batch_size = 2
learning_rate = {DEMO_LEARNING_RATE}            # a tiny model needs a large step to learn within a minute
mixed_precision = "no"
seed = 42

[sample]
# The first {SAMPLED_CAPTIONS} are training captions (their samples approach the training images); the last is new.
prompts = [{prompts}]
every_steps = {DEMO_STEPS // 4}

[output]
dir = "output"
name = "demo_lora"
"""


FAMILIES = ("flux2", "flux1")


def demo_key() -> str:
    """What a build depends on: the demo's code, the code its pre-training runs, the settings it reads from elsewhere
    (the demo flavours, the text token budget, the default flow-matching settings) and the library versions."""
    from importlib.metadata import version

    from trainer import registry
    from trainer.spec import AdvancedSection

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [here / name for name in _SOURCES] + [here / "flow.py", *sorted((here / "families").glob("*.py"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    settings = [registry.get_flavour(family, "demo") for family in FAMILIES]
    digest.update(repr([*settings, registry.DEMO_TEXT_TOKENS, AdvancedSection()]).encode())
    libraries = " ".join(version(name) for name in ("torch", "diffusers", "transformers"))
    digest.update(f"{libraries} {DEMO_SEED}".encode())
    return digest.hexdigest()[:20]


def _stamp(out: Path) -> dict:
    try:
        return json.loads((out / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def build_demo(out_dir: str | Path, families: tuple[str, ...] = FAMILIES,
               report: Callable[[str], None] = lambda _: None) -> Path:
    """Build the demo pipelines, dataset and job.toml under `out_dir`; returns the job file's path. The stamp
    (demo.json, written last) names the key and the families, so an interrupted build is never taken as done."""
    from trainer.quiet import disable_loading_bars

    disable_loading_bars()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)
    started = time.perf_counter()
    built = {}
    for family in sorted(families, key=lambda name: name != "flux2"):  # FLUX.1's VAE is made from FLUX.2's
        flux2 = built.get("flux2")
        built[family] = build_family_demo(out, family, report, flux2.vae if flux2 is not None else None)
    if "flux1" in families:
        write_text_atomic(out / "job_flux1.toml", demo_job_toml("flux1"))
    build_demo_dataset(out)
    if "flux2" in families:
        build_edit_dataset(out)
        write_text_atomic(out / "job_edit.toml", edit_job_toml())
    job = out / "job.toml"
    write_text_atomic(job, demo_job_toml("flux2" if "flux2" in families else "flux1"))
    stamp = {"key": demo_key(), "families": list(families), "seconds": round(time.perf_counter() - started, 1)}
    write_text_atomic(out / STAMP, json.dumps(stamp, indent=1))
    return job


def is_demo_folder(path: str | Path) -> bool:
    return (Path(path) / "job.toml").is_file() and (Path(path) / "dataset").is_dir()


def is_built(out_dir: str | Path, families: tuple[str, ...] = FAMILIES) -> bool:
    """A complete build of this code's demo (same key) with these families is in `out_dir`."""
    out = Path(out_dir)
    stamp = _stamp(out)
    return (stamp.get("key") == demo_key() and set(families) <= set(stamp.get("families", ()))
            and is_demo_folder(out) and all((out / family / "model_index.json").is_file() for family in families))


def cached_build(cache_root: Path, report: Callable[[str], None] = lambda _: None) -> Path:
    """This code's demo in `cache_root`/<key>, built there first if it is not; a lock makes processes that ask at
    once build it once."""
    from filelock import FileLock

    cache_root.mkdir(parents=True, exist_ok=True)
    folder = cache_root / demo_key()
    with FileLock(str(folder) + ".lock"):
        if not is_built(folder):
            build_demo(folder, report=report)
    return folder


def ensure_demo(out_dir: str | Path, emit: Callable[[Event], None] | None = None) -> Path:
    """Build the demo under `out_dir` unless this code's build is already there; returns the job file. With
    FLUX_LORA_STUDIO_DEMO_CACHE set (a folder several work folders share; the tests use one), the build is made
    there once and copied."""
    out = Path(out_dir)
    if not is_built(out):
        def report(stage: str) -> None:
            if emit is not None:
                emit(PhaseChanged(phase="building demo", detail=stage))

        report(f"{out} (once; about a minute)")
        cache = os.environ.get(CACHE_ENV)
        if cache:
            shutil.copytree(cached_build(Path(cache), report), out, dirs_exist_ok=True)
        else:
            build_demo(out, report=report)
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
