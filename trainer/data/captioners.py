"""Automatic captions: a vision-language model writes a caption sidecar beside every image of a folder.

Three kinds of captioner, each loaded with its own transformers class:

- florence2: Florence2ForConditionalGeneration with the "<MORE_DETAILED_CAPTION>" task (a paragraph).
- blip: BlipForConditionalGeneration, unconditional captioning (one short sentence).
- qwen-vl: Qwen2_5_VLForConditionalGeneration answering a chat prompt that asks for a long descriptive
  caption. Qwen2-VL and Qwen3-VL folders take the same path (AutoModelForImageTextToText and their own
  processor class); only Qwen2.5-VL is tested.

`caption_folder` plans which images need a caption, captions them in batches and writes every sidecar
atomically as prefix, trigger, caption, suffix. It can be stopped between batches, and an image it cannot
read is listed in the summary rather than ending the run. Nothing heavy is imported at module level:
the UI can read CAPTIONERS and CaptionOptions without loading torch.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.data.datasets import CAPTION_EXTENSIONS, list_images
from trainer.errors import UserError
from trainer.files import write_text_atomic

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Default sources. microsoft/Florence-2-large is the original remote-code checkpoint, which the Florence2
# classes built into transformers 5 cannot read; florence-community/Florence-2-large holds the same
# weights converted for them.
CAPTIONERS: dict[str, str] = {
    "florence2": "florence-community/Florence-2-large",
    "blip": "Salesforce/blip-image-captioning-large",
    "qwen-vl": "Qwen/Qwen2.5-VL-3B-Instruct",
}

# config.json model_type accepted for each kind.
MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "florence2": ("florence2",),
    "blip": ("blip",),
    "qwen-vl": ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"),
}

FLORENCE_TASK = "<MORE_DETAILED_CAPTION>"
QWEN_PROMPT = (
    "Write a long, detailed caption for this image as one paragraph of plain prose. Describe the main subject, "
    "its appearance, pose and clothing, the setting and background, the lighting, the colours, the composition "
    "and the photographic or artistic style. Do not use lists, headings or markdown, and do not begin with "
    "'The image shows' or 'This image'."
)
# Qwen2.5-VL turns every 28x28 pixels into one token and its processor config allows 12.8 MP (16k tokens).
# About one megapixel (1280 tokens) is plenty for a caption and keeps a batch inside a small GPU.
QWEN_MAX_PIXELS = 1280 * 28 * 28
# Beam search, as the Florence-2 and BLIP model cards caption; Qwen-VL answers greedily.
NUM_BEAMS = {"florence2": 3, "blip": 3, "qwen-vl": 1}
_DOWNLOAD_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


@dataclass
class CaptionOptions:
    trigger: str = ""        # the LoRA's trigger word, written after the prefix
    prefix: str = ""         # text before the trigger and caption, e.g. a style name
    suffix: str = ""         # text after the caption
    max_length: int = 200    # tokens the model may generate per caption
    max_chars: int = 2000    # whole sidecar, about the 512-token limit of FLUX's text encoders; 0 = no limit
    overwrite: bool = False  # replace captions that already exist (otherwise those images are skipped)
    extension: str = ".txt"  # sidecar extension, as datasets read it
    batch_size: int = 4      # images per generate call; lower it if the GPU runs out of memory
    separator: str = ", "    # between prefix, trigger, caption and suffix

    def check(self, flags: bool = False) -> None:
        """Raise one UserError naming every option that cannot work: by its key, or (`flags`, for the CLI) as the
        command line spells it (--batch-size)."""
        def name(key: str) -> str:
            return "--" + key.replace("_", "-") if flags else key

        problems = []
        if self.max_length < 1:
            problems.append(f"{name('max_length')} must be at least 1 token (got {self.max_length})")
        if self.max_chars < 0:
            problems.append(f"{name('max_chars')} must be 0 (no limit) or more (got {self.max_chars})")
        if self.batch_size < 1:
            problems.append(f"{name('batch_size')} must be at least 1 (got {self.batch_size})")
        extension = self.extension if self.extension.startswith(".") else f".{self.extension}"
        if not re.fullmatch(r"\.[A-Za-z0-9_]+", extension):
            problems.append(f"{name('extension')} must look like .txt (got {self.extension!r})")
        if problems:
            raise UserError("caption options: " + "; ".join(problems))

    @property
    def sidecar_suffix(self) -> str:
        return self.extension if self.extension.startswith(".") else f".{self.extension}"


@dataclass
class CaptionSummary:
    folder: Path
    total: int = 0                                     # images in the folder
    captioned: list[Path] = field(default_factory=list)  # images whose sidecar was written
    skipped: list[Path] = field(default_factory=list)    # already had a caption (and overwrite was off)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # image, why it could not be read
    empty: list[Path] = field(default_factory=list)      # the model returned no text; no sidecar written
    stopped: bool = False                              # should_stop ended the run between batches
    seconds: float = 0.0

    def describe(self) -> str:
        """One paragraph for a log line or the UI."""
        parts = [f"captioned {len(self.captioned)} of {self.total} images in {self.folder}"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} already had a caption")
        if self.unreadable:
            names = ", ".join(f"{path.name} ({reason})" for path, reason in self.unreadable)
            parts.append(f"{len(self.unreadable)} could not be read: {names}")
        if self.empty:
            parts.append(f"the model gave no text for {', '.join(path.name for path in self.empty)}")
        if self.stopped:
            parts.append("stopped before the end")
        return "; ".join(parts) + f" ({self.seconds:.1f} s)"


# --- the model -------------------------------------------------------------------------------------------


class Captioner:
    """A loaded captioning model: `Captioner.load(...)`, then `caption(images)` as often as needed, then close()."""

    def __init__(self, kind: str, source: str, model: Any, processor: Any, device: torch.device,
                 dtype: torch.dtype, prompt: str | None = None) -> None:
        self.kind = kind
        self.source = source
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.prompt = prompt
        self._stop_ids = _stop_token_ids(kind, model, processor)

    @classmethod
    def load(cls, kind: str, source: str | Path | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, prompt: str | None = None) -> Captioner:
        """Load a captioner of `kind` from a hub id or a local folder (default: CAPTIONERS[kind]).

        device: "cuda", "cuda:1", "cpu"... (default: the first GPU, else the CPU). dtype: "bf16", "fp16",
        "fp32" or a torch dtype (default: bf16 on a GPU that has it, fp16 on other GPUs, fp32 on the CPU).
        prompt: the instruction a qwen-vl captioner answers (default QWEN_PROMPT); other kinds take none.
        """
        check_kind(kind, prompt)
        source = str(source) if source else CAPTIONERS[kind]
        torch_device = _pick_device(device)
        torch_dtype = _pick_dtype(dtype, torch_device)
        folder = _resolve_source(kind, source)
        model_type = _check_model_folder(kind, source, folder)
        try:
            model, processor = _load_parts(kind, model_type, folder, torch_dtype, torch_device)
            model.eval()
        except Exception as exc:  # noqa: BLE001 - any failure to load is the same message; --debug has the chain
            raise UserError(_cannot_load(kind, source, f"{type(exc).__name__}: {_first_line(exc)}")) from exc
        return cls(kind, source, model, processor, torch_device, torch_dtype,
                   (prompt or QWEN_PROMPT) if kind == "qwen-vl" else None)

    def caption(self, images: list[Image.Image], max_new_tokens: int = 200) -> list[str]:
        """One caption per image (RGB PIL images), each a single line of at most `max_new_tokens` tokens.

        A caption cut off by the token limit loses its unfinished last sentence when it has a finished one.
        An empty string means the model produced no text for that image.
        """
        import torch

        if not images:
            return []
        if self.model is None:
            raise RuntimeError("this captioner was closed")
        inputs, prompt_length = self._inputs(images)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         num_beams=NUM_BEAMS[self.kind], **self._generate_kwargs())
        generated = output[:, prompt_length:]
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        captions = []
        for row, text in zip(generated.tolist(), texts, strict=True):
            text = " ".join(text.split())
            finished = any(token in self._stop_ids for token in row)
            captions.append(text if finished else _drop_unfinished_sentence(text))
        return captions

    def close(self) -> None:
        """Free the model's memory (CPU and GPU); the captioner cannot caption afterwards."""
        import gc

        import torch

        self.model = None
        self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _inputs(self, images: list[Image.Image]) -> tuple[dict[str, Any], int]:
        """Model inputs on the device, and how many leading tokens of generate's output are not the caption."""
        if self.kind == "florence2":
            # The decoder output starts with its start token; the forced <s> after it is a special token.
            batch = self.processor(text=[FLORENCE_TASK] * len(images), images=images, return_tensors="pt")
            prompt_length = 1
        elif self.kind == "blip":
            # BLIP's generate returns its [DEC] prompt token in front of the caption.
            batch = self.processor(images=images, return_tensors="pt")
            prompt_length = 1
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            batch = self.processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")
            prompt_length = batch["input_ids"].shape[1]
        inputs = {name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                  for name, value in batch.items()}
        return inputs, prompt_length

    def _generate_kwargs(self) -> dict[str, Any]:
        if self.kind == "qwen-vl":
            return {"pad_token_id": self.processor.tokenizer.pad_token_id}
        return {}


def check_kind(kind: str, prompt: str | None = None) -> None:
    if kind not in CAPTIONERS:
        raise UserError(f"unknown captioner {kind!r}; choose one of {', '.join(CAPTIONERS)}")
    if prompt is not None and kind != "qwen-vl":
        raise UserError(f"a prompt only applies to the qwen-vl captioner, not {kind}")


def _load_parts(kind: str, model_type: str, folder: Path, dtype: torch.dtype,
                device: torch.device) -> tuple[Any, Any]:
    """The model, loaded straight onto the device, and its processor (with a PIL image processor)."""
    import transformers

    model_class = {"florence2": transformers.Florence2ForConditionalGeneration,
                   "blip": transformers.BlipForConditionalGeneration,
                   "qwen-vl": transformers.AutoModelForImageTextToText}[kind]
    model = model_class.from_pretrained(folder, dtype=dtype, device_map=str(device))
    if kind == "qwen-vl":
        return model, _qwen_processor(model_type, folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


_QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def _qwen_processor(model_type: str, folder: Path) -> Any:
    """The Qwen-VL processor without its video half.

    AutoProcessor cannot build these processors here: their video processor needs torchvision, and
    ProcessorMixin rejects a missing one (transformers 5.23 looks up VideoProcessorMixin, which exists only
    with torchvision). Captions need images only, so the processor is assembled from the image processor
    (the PIL one), the tokenizer and the chat template, accepting None for the video processor.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    base = getattr(transformers, _QWEN_PROCESSORS[model_type])

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, argument_name: str, argument: object) -> Any:
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = AutoImageProcessor.from_pretrained(folder)
    size = getattr(image_processor, "size", None)
    if size is not None and getattr(size, "longest_edge", None) and size.longest_edge > QWEN_MAX_PIXELS:
        from transformers.image_utils import SizeDict

        shortest = size.shortest_edge if size.shortest_edge is None else min(size.shortest_edge, QWEN_MAX_PIXELS)
        image_processor.size = SizeDict(shortest_edge=shortest, longest_edge=QWEN_MAX_PIXELS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # batched generation appends to the right end of every row
    processor = ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=_chat_template(folder) or tokenizer.chat_template)
    if not processor.chat_template:
        raise ValueError(f"no chat template in {folder} (chat_template.jinja, chat_template.json or the tokenizer)")
    return processor


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if template:
                return template
    return None


def _stop_token_ids(kind: str, model: Any, processor: Any) -> set[int]:
    """Tokens whose presence in a generated row means the caption ended by itself (not by the length limit)."""
    ids: set[int] = set()
    if kind == "blip":
        text_config = model.config.text_config
        candidates = [text_config.sep_token_id, text_config.pad_token_id]
    else:
        eos = model.generation_config.eos_token_id
        candidates = [*(eos if isinstance(eos, list) else [eos]), model.generation_config.pad_token_id,
                      processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id]
    ids.update(int(token) for token in candidates if token is not None)
    return ids


def _pick_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"device {device!r} is not a device torch knows ({_first_line(exc)})") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asks for a GPU but torch sees none; use --device cpu")
    return chosen


def _pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of auto, bf16, fp16, fp32")
    return getattr(torch, _DTYPES[dtype])


def _resolve_source(kind: str, source: str) -> Path:
    """A local folder as is; a hub id downloaded (or found in the cache) with huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(_cannot_load(kind, source, "it is a file, not a model folder"))
    if not _looks_like_hub_id(source):
        raise UserError(_cannot_load(kind, source, "there is no such folder"))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        folder = Path(snapshot_download(source, allow_patterns=_DOWNLOAD_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # an older repository with PyTorch .bin weights only
            folder = Path(snapshot_download(source, allow_patterns=[*_DOWNLOAD_PATTERNS, "*.bin"]))
    except HFValidationError:
        reason = "there is no such folder, and it is not a valid Hugging Face hub id either"
        raise UserError(_cannot_load(kind, source, reason)) from None
    except GatedRepoError:
        reason = "the hub repository is gated: accept its licence on huggingface.co and log in with `hf auth login`"
        raise UserError(_cannot_load(kind, source, reason)) from None
    except RepositoryNotFoundError:
        reason = "there is no such folder, and no such hub repository (or it is private: `hf auth login`)"
        raise UserError(_cannot_load(kind, source, reason)) from None
    except LocalEntryNotFoundError:
        reason = "it is not in the local Hugging Face cache and could not be downloaded (offline, or HF_HUB_OFFLINE=1)"
        raise UserError(_cannot_load(kind, source, reason)) from None
    except OSError as exc:  # disk full, permissions, broken connection mid-download
        raise UserError(_cannot_load(kind, source, f"the download failed: {_first_line(exc)}")) from None
    return folder


def _check_model_folder(kind: str, source: str, folder: Path) -> str:
    """The folder's model_type, after checking that it is a model of this kind in the format transformers reads."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(_cannot_load(kind, source, f"{folder} has no config.json, so it is not a model folder"))
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(_cannot_load(kind, source, f"{config_path} is not readable JSON ({exc})")) from None
    model_type = config.get("model_type", "")
    text_type = (config.get("text_config") or {}).get("model_type", "")
    if kind == "florence2" and (text_type == "florence2_language" or "auto_map" in config):
        raise UserError(
            f"cannot load the florence2 captioning model from {source}: it is the original remote-code "
            "Florence-2 format, which the Florence-2 built into transformers cannot read. Use the converted "
            f"weights instead: {CAPTIONERS['florence2']} (or florence-community/Florence-2-base), "
            "or a fine-tune saved in that format."
        )
    if model_type not in MODEL_TYPES[kind]:
        other = next((name for name, types in MODEL_TYPES.items() if model_type in types), None)
        hint = f"; it is a {other} model, so choose that captioner" if other else ""
        raise UserError(f"{source} holds a {model_type or 'unknown'} model, not a {kind} captioner "
                        f"(expected model_type {' or '.join(MODEL_TYPES[kind])}){hint}")
    return model_type


def _cannot_load(kind: str, source: str, reason: str) -> str:
    """The one message for a model that will not load: what, from where, why, and the two ways to fix it."""
    repo = source if _looks_like_hub_id(source) else CAPTIONERS[kind]
    return (f"cannot load the {kind} captioning model from {source}: {reason}. To fix it, download it while "
            f"online (`hf download {repo}`, or run this once with internet access), or give as --source the path "
            f"of a local folder that holds the model.")


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not Path(source).expanduser().exists()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _drop_unfinished_sentence(text: str) -> str:
    """'A cat. It sits on a' -> 'A cat.': a caption cut by the token limit keeps its finished sentences."""
    ends = [match.end() for match in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[-1]] if ends else text


# --- the folder ------------------------------------------------------------------------------------------


def has_caption(image_path: Path, options: CaptionOptions) -> bool:
    """True when the image already has a non-empty caption sidecar (the target extension or one datasets read)."""
    for extension in dict.fromkeys((options.sidecar_suffix, *CAPTION_EXTENSIONS)):
        sidecar = image_path.with_suffix(extension)
        if sidecar.is_file() and sidecar.read_text(encoding="utf-8", errors="replace").strip():
            return True
    return False


def plan_captions(folder: Path, options: CaptionOptions) -> tuple[list[Path], list[Path]]:
    """(images to caption, images skipped because they have a caption), in the folder's sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of images to caption")
    images = list_images(folder)
    if options.overwrite:
        return images, []
    pending, skipped = [], []
    for image in images:
        (skipped if has_caption(image, options) else pending).append(image)
    return pending, skipped


def compose_caption(caption: str, options: CaptionOptions) -> str:
    """prefix, trigger, caption, suffix joined by the separator; only the caption is trimmed to max_chars."""
    caption = " ".join(caption.split())
    head = [part for part in (" ".join(options.prefix.split()), " ".join(options.trigger.split())) if part]
    tail = [part for part in (" ".join(options.suffix.split()),) if part]
    if options.max_chars:
        # Adding the caption to the fixed parts adds its own length and one separator.
        fixed = len(options.separator.join(head + tail)) + (len(options.separator) if head or tail else 0)
        caption = trim_caption(caption, max(0, options.max_chars - fixed))
    return options.separator.join(part for part in (*head, caption, *tail) if part)


def trim_caption(text: str, max_chars: int) -> str:
    """Cut to at most max_chars at the last sentence end, else at the last word boundary, never mid-word."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    ends = [match.end() for match in re.finditer(r"[.!?](?=\s|$)", cut)]
    if ends and ends[-1] >= max_chars // 2:  # a sentence end that keeps at least half of the room
        return cut[:ends[-1]]
    if text[max_chars:max_chars + 1].isspace():  # the cut fell exactly between two words
        return cut.rstrip(" ,;:-")
    words = cut.rsplit(" ", 1)
    return words[0].rstrip(" ,;:-") if len(words) > 1 else ""


def open_image(path: Path) -> Image.Image:
    """The image as RGB with EXIF orientation applied and transparency flattened onto white."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _header_problem(path: Path) -> str | None:
    """Why PIL cannot even identify this file as an image (reads the header only), or None."""
    from PIL import Image

    try:
        with Image.open(path):
            return None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return _first_line(exc)


def caption_folder(folder: Path, captioner: Captioner, options: CaptionOptions | None = None,
                   progress: Callable[[int, int, str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> CaptionSummary:
    """Caption every image of `folder` that needs it, writing sidecars as it goes.

    progress(done, total, image name) is called once per image to caption (total counts only those);
    should_stop() is asked before every batch.
    """
    import torch
    from PIL import Image

    options = options or CaptionOptions()
    options.check()
    started = time.monotonic()
    pending, skipped = plan_captions(folder, options)
    summary = CaptionSummary(Path(folder), total=len(pending) + len(skipped), skipped=skipped)
    done = 0

    def report(path: Path) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(pending), path.name)

    for start in range(0, len(pending), options.batch_size):
        if should_stop is not None and should_stop():
            summary.stopped = True
            break
        paths, images = [], []
        for path in pending[start:start + options.batch_size]:
            try:
                images.append(open_image(path))
                paths.append(path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                summary.unreadable.append((path, _first_line(exc)))
                report(path)
        if not images:
            continue
        try:
            captions = captioner.caption(images, max_new_tokens=options.max_length)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory captioning {len(images)} images at once with {captioner.kind} on "
                            f"{captioner.device}; lower --batch-size") from None
        for path, caption in zip(paths, captions, strict=True):
            if caption:
                write_text_atomic(path.with_suffix(options.sidecar_suffix), compose_caption(caption, options) + "\n")
                summary.captioned.append(path)
            else:
                summary.empty.append(path)
            report(path)
    summary.seconds = time.monotonic() - started
    return summary


def caption_dataset(folder: Path, kind: str, source: str | Path | None = None,
                    options: CaptionOptions | None = None, device: str | None = None, dtype: str | None = None,
                    prompt: str | None = None, progress: Callable[[int, int, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    status: Callable[[str], None] | None = None) -> CaptionSummary:
    """Load the captioner, caption the folder, free the model: one call for the CLI and the UI's worker thread.

    When no image needs a caption the model is not loaded at all. status(line) hears what is happening.
    """
    check_kind(kind, prompt)
    options = options or CaptionOptions()
    options.check()
    pending, skipped = plan_captions(folder, options)
    unreadable = [(path, problem) for path in pending if (problem := _header_problem(path))]
    if len(unreadable) == len(pending):  # nothing the model could caption: do not load it
        return CaptionSummary(Path(folder), total=len(pending) + len(skipped), skipped=skipped, unreadable=unreadable)
    say = status or (lambda line: None)
    say(f"loading the {kind} captioner from {source or CAPTIONERS[kind]} ...")
    captioner = Captioner.load(kind, source, device=device, dtype=dtype, prompt=prompt)
    try:
        count = f"{len(pending)} image{'' if len(pending) == 1 else 's'}"
        say(f"captioning {count} on {captioner.device} ({str(captioner.dtype).removeprefix('torch.')})")
        return caption_folder(folder, captioner, options, progress=progress, should_stop=should_stop)
    finally:
        captioner.close()
