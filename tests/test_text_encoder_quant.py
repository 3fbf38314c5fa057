"""Quantised text encoders (model.text_encoder_precision fp8/int8/int4/nf4): every Linear streams in quantised, the
embeddings stay close to the full-precision ones, streamed ("offload") placement runs them unchanged, an fp8
single file loaded as fp8 keeps its stored values, and a packed-format file in a slot is refused by name before
anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer import registry
from trainer.families import family_ops
from trainer.memory.placement import TextEncoderPlacement
from trainer.memory.quantize import QuantizedTextLinear
from trainer.sources import ModelFiles
from trainer.sources.recognise import check_file

PROMPTS = ["a red cube on a table", "a cat"]
SKIP = ("transformer", "vae")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _encoders(pipe: object) -> list[torch.nn.Module]:
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


@pytest.mark.parametrize(("family", "fmt", "least"), [("flux2", "int8", 0.999), ("flux2", "nf4", 0.98),
                                                      ("flux1", "fp8", 0.99), ("flux1", "int4", 0.98)])
def test_quantised_text_encoders_stream_in_and_embed_like_full_precision(demo_dir: Path, family: str, fmt: str,
                                                                         least: float) -> None:
    ops, flavour = family_ops(family), registry.get_flavour(family, "demo")
    full = ops.load_pipeline(str(demo_dir / family), flavour, torch.float32, skip=SKIP)
    expected = ops.encode_prompts(full, PROMPTS, flavour)
    pipe = ops.load_pipeline(str(demo_dir / family), flavour, torch.float32, skip=SKIP, text_encoder_precision=fmt)
    for encoder in _encoders(pipe):
        table = encoder.get_input_embeddings().weight
        # every Linear but a head tied to the token table (it shares the table's tensor, in the compute dtype)
        linears = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear) and m.weight is not table]
        assert linears and all(isinstance(m, QuantizedTextLinear) and m.format == fmt for m in linears)
        assert not any(p.is_meta for p in encoder.parameters())
    got = ops.encode_prompts(pipe, PROMPTS, flavour)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and _cosine(got[name], value) >= least, name
    placement = TextEncoderPlacement(pipe, torch.device("cpu"), "offload")  # layers streamed: the same numbers
    streamed = ops.encode_prompts(pipe, PROMPTS, flavour)
    placement.release()
    for name, value in got.items():
        torch.testing.assert_close(streamed[name], value, rtol=0, atol=0, msg=name)


def _fp8_file(source: Path, target: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's `*_fp8_e4m3fn` layout: every 2-D weight cast to e4m3 with one fp32 scale per tensor."""
    tensors = {}
    for path in sorted(source.glob("*.safetensors")):
        for name, value in load_file(path).items():
            if value.ndim == 2 and name.endswith(".weight") and "embed" not in name:
                scale = value.abs().max().float() / 448.0
                tensors[name] = (value.float() / scale).to(torch.float8_e4m3fn)
                tensors[name.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
            else:
                tensors[name] = value
    save_file(tensors, str(target))
    return tensors


def test_an_fp8_single_file_loads_as_it_is(demo_dir: Path, tmp_path: Path) -> None:
    ops, flavour = family_ops("flux2"), registry.get_flavour("flux2", "demo")
    stored = _fp8_file(demo_dir / "flux2" / "text_encoder", tmp_path / "qwen_fp8_e4m3fn.safetensors")
    files = ModelFiles(text_encoder=str(tmp_path / "qwen_fp8_e4m3fn.safetensors"))
    pipe = ops.load_pipeline(str(demo_dir / "flux2"), flavour, torch.float32, skip=SKIP, files=files,
                             text_encoder_precision="fp8")
    for name, module in pipe.text_encoder.named_modules():
        if isinstance(module, QuantizedTextLinear) and f"{name}.weight" in stored:
            # the file's bytes, not a second rounding of a dequantised copy
            assert torch.equal(module.qweight.view(torch.uint8), stored[f"{name}.weight"].view(torch.uint8))
            assert torch.equal(module.scale, stored[f"{name}.scale_weight"].expand(module.out_features))
    plain = ops.load_pipeline(str(demo_dir / "flux2"), flavour, torch.float32, skip=SKIP, files=files)
    expected = ops.encode_prompts(plain, PROMPTS, flavour)  # the same file dequantised at load
    got = ops.encode_prompts(pipe, PROMPTS, flavour)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_packed_text_encoder_file_is_refused_by_name_before_loading(demo_dir: Path, tmp_path: Path) -> None:
    tensors = {}
    for path in sorted((demo_dir / "flux2" / "text_encoder").glob("*.safetensors")):
        tensors.update(load_file(path))
    packed = {name: (torch.zeros(value.numel() // 2 + 1, dtype=torch.uint8) if value.ndim == 2 else value)
              for name, value in tensors.items()}  # a bitsandbytes-style nf4 file: U8 bytes, not weights
    path = tmp_path / "qwen_nf4.safetensors"
    save_file(packed, str(path))
    message = check_file("text_encoder", path, registry.get_flavour("flux2", "demo"))
    assert message is not None and message.startswith("model.text_encoder: 'qwen_nf4.safetensors'")
    assert "U8" in message and "bf16, fp16 or fp8" in message


def test_a_run_loads_one_model_at_a_time_with_a_quantised_text_encoder(demo_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.session import Session
    from trainer.sources import assemble
    from trainer.spec import load_spec, resolve_paths

    seen = []
    real = assemble.load_transformer

    def load_transformer(*args: object, **kwargs: object) -> torch.nn.Module:
        seen.append((session.pipe.text_encoder, session.pipe.transformer))  # what is loaded when it starts
        return real(*args, **kwargs)

    monkeypatch.setattr(assemble, "load_transformer", load_transformer)
    settings = ["train.max_steps=1", "sample.prompts=[]", "model.text_encoder_precision='int8'",
                f"output.dir='{tmp_path}'"]
    session = Session(resolve_paths(load_spec(demo_dir / "job.toml", settings), demo_dir))
    try:
        session.setup()
        session.train()
        assert seen == [(None, None)]  # the text encoder was freed before the transformer began to load
        assert len(session.losses) == 1 and all(torch.isfinite(torch.tensor(session.losses)))
    finally:
        session.end()
