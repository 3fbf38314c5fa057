"""Captioning: tiny random Florence-2, BLIP and Qwen2.5-VL models of the real classes, saved and loaded offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.data.captioners import (
    QWEN_MAX_PIXELS,
    Captioner,
    CaptionOptions,
    _drop_unfinished_sentence,
    caption_folder,
    compose_caption,
    open_image,
    trim_caption,
)
from trainer.errors import UserError

KINDS = ("florence2", "blip", "qwen-vl")
SEED = 0
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- tiny models ------------------------------------------------------------------------------------------


def build_florence2(target: Path) -> Path:
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    from trainer.demo import _byte_level_alphabet

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", *_byte_level_alphabet()])}
    vocab["<image>"] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    # Two vision stages of stride 4 and 2 turn 32x32 pixels into 4x4 features, plus one pooled token.
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                            image_seq_length=17)
    text = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_bos_token_id=0)
    vision = dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                  patch_prenorm=(False, True), embed_dim=(16, 16), num_heads=(2, 2), num_groups=(2, 2),
                  window_size=4, projection_dim=16, drop_path_rate=0.0)
    torch.manual_seed(SEED)
    model = Florence2ForConditionalGeneration(Florence2Config(text_config=text, vision_config=vision,
                                                              image_token_id=tokenizer.image_token_id))
    model.save_pretrained(target)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(target)
    return target


def build_blip(target: Path) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate([*specials, *letters, *(f"##{c}" for c in letters)])}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=0, sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    torch.manual_seed(SEED)
    BlipForConditionalGeneration(config).save_pretrained(target)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(target)
    return target


def build_qwen_vl(target: Path) -> Path:
    """Saved the way the hub repository is: preprocessor_config.json, tokenizer files, a chat template file.

    (Qwen2_5_VLProcessor itself cannot be built or saved without torchvision; see _qwen_processor.)
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from trainer.demo import _qwen_tokenizer

    tokenizer = _qwen_tokenizer()
    tokenizer.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], special_tokens=True)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>", "<|endoftext|>")}
    # The real repository's pixel limits (min 56x56, max 12.8 MP); the captioner lowers the maximum.
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=16,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(SEED)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(target)
    image_processor.save_pretrained(target)
    tokenizer.chat_template = None  # the chat template comes from the processor's file, as in the hub repository
    tokenizer.save_pretrained(target)
    (target / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}), encoding="utf-8")
    return target


BUILDERS = {"florence2": build_florence2, "blip": build_blip, "qwen-vl": build_qwen_vl}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {kind: build(root / kind) for kind, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def captioners(model_dirs: dict[str, Path]):
    loaded = {kind: Captioner.load(kind, model_dirs[kind], device="cpu") for kind in KINDS}
    yield loaded
    for captioner in loaded.values():
        captioner.close()


def make_images(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (235, 210, 40)]
    paths = []
    for index in range(count):
        image = Image.new("RGB", (48 + 8 * index, 40), colours[index % len(colours)])
        image.paste((250, 250, 250), (8, 8, 24, 24))
        path = folder / f"image_{index}.png"
        image.save(path)
        paths.append(path)
    return paths


def sidecar(path: Path) -> Path:
    return path.with_suffix(".txt")


# --- one folder, each kind ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_caption_folder_writes_composed_sidecars(kind, captioners, tmp_path):
    images = make_images(tmp_path / "data")
    calls = []
    options = CaptionOptions(trigger="ohwx", prefix="photo", suffix="high quality", max_length=12, batch_size=2)
    summary = caption_folder(tmp_path / "data", captioners[kind], options,
                             progress=lambda done, total, name: calls.append((done, total, name)))
    assert summary.captioned == images and not summary.skipped and not summary.unreadable and not summary.stopped
    assert calls == [(1, 3, "image_0.png"), (2, 3, "image_1.png"), (3, 3, "image_2.png")]
    for image in images:
        text = sidecar(image).read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        assert text.startswith("photo, ohwx, ") and text.rstrip("\n").endswith(", high quality")
        assert len(text) > len("photo, ohwx, , high quality\n")  # the model wrote something in between
    assert "captioned 3 of 3 images" in summary.describe()


@pytest.mark.parametrize("kind", KINDS)
def test_existing_caption_is_kept_unless_overwrite(kind, captioners, tmp_path):
    images = make_images(tmp_path)
    sidecar(images[1]).write_text("my own caption\n", encoding="utf-8")
    sidecar(images[2]).write_text("  \n", encoding="utf-8")  # empty: captioned
    calls = []
    summary = caption_folder(tmp_path, captioners[kind], CaptionOptions(max_length=8),
                             progress=lambda *call: calls.append(call))
    assert summary.skipped == [images[1]] and summary.captioned == [images[0], images[2]]
    assert sidecar(images[1]).read_text(encoding="utf-8") == "my own caption\n"
    assert [total for _, total, _ in calls] == [2, 2]

    summary = caption_folder(tmp_path, captioners[kind], CaptionOptions(max_length=8, overwrite=True))
    assert summary.captioned == images and not summary.skipped
    assert sidecar(images[1]).read_text(encoding="utf-8") != "my own caption\n"


@pytest.mark.parametrize("kind", KINDS)
def test_max_length_bounds_the_generated_tokens(kind, captioners, tmp_path, monkeypatch):
    images = make_images(tmp_path)
    captioner = captioners[kind]
    seen = []
    generate = captioner.model.generate

    def spy(**kwargs):
        output = generate(**kwargs)
        seen.append((kwargs["max_new_tokens"], output.shape[1], kwargs.get("input_ids")))
        return output

    monkeypatch.setattr(captioner.model, "generate", spy)
    summary = caption_folder(tmp_path, captioner, CaptionOptions(max_length=3, batch_size=3))
    assert len(summary.captioned) == 3 and len(seen) == 1
    max_new_tokens, length, input_ids = seen[0]
    prompt = input_ids.shape[1] if kind == "qwen-vl" else 1  # decoder start / [DEC] token otherwise
    assert max_new_tokens == 3 and length - prompt <= 3
    for image in images:
        assert len(sidecar(image).read_text(encoding="utf-8").split()) <= 3  # no more words than tokens


@pytest.mark.parametrize("kind", KINDS)
def test_stops_between_batches(kind, captioners, tmp_path):
    images = make_images(tmp_path)
    calls = []
    summary = caption_folder(tmp_path, captioners[kind], CaptionOptions(max_length=8, batch_size=1),
                             progress=lambda *call: calls.append(call), should_stop=lambda: len(calls) >= 1)
    assert summary.stopped and summary.captioned == [images[0]] and len(calls) == 1
    assert sidecar(images[0]).is_file() and not sidecar(images[1]).exists() and not sidecar(images[2]).exists()
    assert "stopped before the end" in summary.describe()


@pytest.mark.parametrize("kind", KINDS)
def test_unreadable_image_is_listed_and_the_rest_captioned(kind, captioners, tmp_path):
    images = make_images(tmp_path)
    broken = tmp_path / "image_1b.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    calls = []
    summary = caption_folder(tmp_path, captioners[kind], CaptionOptions(max_length=8, batch_size=2),
                             progress=lambda *call: calls.append(call))
    assert summary.captioned == images and [path for path, _ in summary.unreadable] == [broken]
    assert not sidecar(broken).exists() and len(calls) == 4
    assert "image_1b.png" in summary.describe()


# --- loading -------------------------------------------------------------------------------------------------


def test_loads_pil_image_processors_and_caps_qwen_pixels(captioners):
    for captioner in captioners.values():
        assert type(captioner.processor.image_processor).__name__.endswith("Pil")
    assert captioners["qwen-vl"].processor.image_processor.size.longest_edge == QWEN_MAX_PIXELS
    assert captioners["qwen-vl"].processor.video_processor is None


def test_missing_source_gives_clear_error(tmp_path):
    with pytest.raises(UserError) as missing_folder:
        Captioner.load("blip", tmp_path / "no-such-model", device="cpu")
    message = str(missing_folder.value)
    assert "cannot load the blip captioning model from" in message and "no-such-model" in message
    assert "no such folder" in message and "--source" in message and "hf download" in message

    with pytest.raises(UserError) as missing_repo:  # tests run offline: neither cached nor downloadable
        Captioner.load("qwen-vl", "nobody-here/no-such-captioner", device="cpu")
    message = str(missing_repo.value)
    assert "from nobody-here/no-such-captioner" in message and "hf download nobody-here/no-such-captioner" in message
    assert "--source" in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        Captioner.load("florence2", tmp_path / "empty", device="cpu")


def test_broken_weights_give_clear_error(model_dirs, tmp_path):
    import shutil

    broken = tmp_path / "blip"
    shutil.copytree(model_dirs["blip"], broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match=r"cannot load the blip captioning model from .*blip: .*--source"):
        Captioner.load("blip", broken, device="cpu")


def test_wrong_kind_and_original_florence_format(model_dirs, tmp_path):
    with pytest.raises(UserError, match="holds a blip model, not a florence2 captioner.*choose that captioner"):
        Captioner.load("florence2", model_dirs["blip"], device="cpu")
    legacy = tmp_path / "Florence-2-large"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({
        "model_type": "florence2", "auto_map": {"AutoModelForCausalLM": "modeling_florence2.Florence2ForCausalLM"},
        "text_config": {"model_type": "florence2_language"},
    }), encoding="utf-8")
    with pytest.raises(UserError, match="original remote-code Florence-2 format.*florence-community/Florence-2-large"):
        Captioner.load("florence2", legacy, device="cpu")
    with pytest.raises(UserError, match="only applies to the qwen-vl captioner"):
        Captioner.load("blip", model_dirs["blip"], device="cpu", prompt="describe")


# --- composing and trimming ----------------------------------------------------------------------------------


def test_compose_and_trim():
    options = CaptionOptions(trigger=" ohwx ", prefix="photo", suffix="8k", max_chars=60)
    caption = "A red  circle on a green field. It glows softly in the warm evening light of the late summer sun."
    text = compose_caption(caption, options)
    assert text == "photo, ohwx, A red circle on a green field., 8k" and len(text) <= 60
    assert compose_caption("a cat", CaptionOptions()) == "a cat"
    assert compose_caption("a cat", CaptionOptions(trigger="ohwx", separator=" ")) == "ohwx a cat"
    assert trim_caption("one two three four", 12) == "one two"
    assert trim_caption("one two three four", 13) == "one two three"
    assert trim_caption("short", 100) == "short"
    assert _drop_unfinished_sentence("A red cat. It sits on a") == "A red cat."
    assert _drop_unfinished_sentence("A red cat sits on a") == "A red cat sits on a"
    assert _drop_unfinished_sentence("It costs 3.5 dollars. It") == "It costs 3.5 dollars."
    assert trim_caption("unbreakable", 4) == ""
    # The fixed parts are the user's own text: never cut, even past the limit.
    long_trigger = CaptionOptions(trigger="a-very-long-trigger", max_chars=10)
    assert compose_caption("a cat", long_trigger) == "a-very-long-trigger"


def test_options_are_checked():
    with pytest.raises(UserError, match="max_length.*batch_size.*extension"):
        CaptionOptions(max_length=0, batch_size=0, extension="t x t").check()
    assert CaptionOptions(extension="caption").sidecar_suffix == ".caption"


def test_open_image_flattens_transparency_and_applies_exif(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert open_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    rotated = Image.new("RGB", (16, 8), (10, 20, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (8, 16)


# --- the command line ------------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    from trainer.captioning_cli import add_parser

    parser = argparse.ArgumentParser(prog="python -m trainer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_captions_a_folder(model_dirs, tmp_path, capsys):
    images = make_images(tmp_path / "data")
    args = _parse(["caption", str(tmp_path / "data"), "--model", "blip", "--source", str(model_dirs["blip"]),
                   "--trigger", "ohwx", "--suffix", "studio photo", "--max-length", "6", "--batch-size", "2",
                   "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0
    assert all(sidecar(image).read_text(encoding="utf-8").startswith("ohwx, ") for image in images)
    assert "captioned 3 of 3 images" in capsys.readouterr().out

    args = _parse(["caption", str(tmp_path / "data"), "--model", "blip", "--source", str(tmp_path / "nowhere")])
    assert args.func(args) == 0  # nothing to do: the model is not even loaded
    assert "already have a caption" in capsys.readouterr().out

    args = _parse(["caption", str(tmp_path / "data"), "--model", "blip", "--source", str(tmp_path / "nowhere"),
                   "--overwrite"])
    with pytest.raises(UserError, match="cannot load the blip captioning model"):
        args.func(args)
    args = _parse(["caption", str(tmp_path / "missing"), "--model", "florence2"])
    with pytest.raises(UserError, match="no such folder of images"):
        args.func(args)
    args = _parse(["caption", str(tmp_path / "data"), "--batch-size", "0", "--max-chars", "-1"])
    with pytest.raises(UserError, match="--max-chars must be 0 .*--batch-size must be at least 1 \\(got 0\\)"):
        args.func(args)  # the options as the command line spells them


def test_caption_dataset_loads_no_model_when_nothing_can_be_captioned(tmp_path):
    from trainer.data.captioners import caption_dataset

    (tmp_path / "broken.png").write_bytes(b"not an image")
    summary = caption_dataset(tmp_path, "qwen-vl", tmp_path / "no-model-here")  # loading would raise UserError
    assert [path.name for path, _ in summary.unreadable] == ["broken.png"] and not summary.captioned
    with pytest.raises(UserError, match="unknown captioner 'llava'"):
        caption_dataset(tmp_path, "llava")


def test_importing_the_captioners_loads_no_torch():
    import subprocess
    import sys

    from conftest import python_env

    code = ("import sys, trainer.captioning_cli, trainer.data.captioners; "
            "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), check=True)
    assert result.stdout.strip() == "[]"

