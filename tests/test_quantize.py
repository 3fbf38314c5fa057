"""Quantised base: per-format error bounds, the streamed demo transformers at each precision, sharded files,
and a LoRA trained on a quantised base that loads in diffusers on the bf16 model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.errors import UserError
from trainer.memory.quantize import (
    FORMATS,
    GROUP_SIZE,
    NF4_LEVELS,
    QuantizedLinear,
    dequantize,
    linear_formats,
    load_quantized_transformer,
    quantizable_names,
    quantize_rows,
    storage_bytes,
)
from trainer.spec import modulation_format

FAMILIES = ("flux2", "flux1")
JOBS = {"flux2": "job.toml", "flux1": "job_flux1.toml"}
# Largest error of one dequantised weight, as a fraction of the absmax its scale came from (row, group or
# block): e4m3 keeps 3 mantissa bits (half an ulp is 1/16 of the value, below 2^-6 of 448 the step is fixed);
# round-to-nearest on 127 or 7 steps; NF4: half the widest gap between neighbouring levels.
_FP8_RELATIVE, _FP8_SUBNORMAL_STEP = 2.0**-4, 2.0**-9 / 448
_NF4_WIDEST_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False))
_HALF_STEP = {"int8": 0.5 / 127, "int4": 0.5 / 7, "nf4": _NF4_WIDEST_GAP / 2}
# Relative RMS error of a Gaussian weight, measured 0.027 / 0.009 / 0.108 / 0.092.
_RMS_ERROR = {"fp8": 0.035, "int8": 0.012, "int4": 0.13, "nf4": 0.11}
# Relative L2 distance of the demo transformer's prediction from the bf16 model's (bf16 compute both);
# measured flux2 0.003 / 0.002 / 0.004 / 0.005, flux1 0.006 / 0.004 / 0.011 / 0.014.
_OUTPUT_ERROR = {"fp8": 0.015, "int8": 0.01, "int4": 0.04, "nf4": 0.04}


def _quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(lambda start, stop: weight[start:stop], tuple(weight.shape), fmt)


def _absmax_per_weight(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """For each weight, the absmax of the row, group or block whose scale it shares."""
    out_features, in_features = weight.shape
    if fmt in ("fp8", "int8"):
        return weight.abs().amax(dim=1, keepdim=True).expand_as(weight)
    if fmt == "int4":
        padded = torch.nn.functional.pad(weight.abs(), (0, -in_features % GROUP_SIZE)).view(out_features, -1, 64)
        return padded.amax(dim=2, keepdim=True).expand_as(padded).reshape(out_features, -1)[:, :in_features]
    flat = torch.nn.functional.pad(weight.abs().reshape(-1), (0, -weight.numel() % GROUP_SIZE)).view(-1, 64)
    return flat.amax(dim=1, keepdim=True).expand_as(flat).reshape(-1)[: weight.numel()].view_as(weight)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(96, 128), (37, 100)])  # the second: rows not a multiple of 64 (padding)
def test_dequantised_error_is_within_the_format_bound(fmt: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.02
    weight[3] = 0.0  # an all-zero row stays exactly zero
    values, scales = _quantize(weight, fmt)
    assert values.numel() * values.element_size() + scales.numel() * 4 == storage_bytes(*shape, fmt)
    restored = dequantize(values, scales, fmt, shape, torch.float32)
    error = (restored - weight).abs()
    absmax = _absmax_per_weight(weight, fmt)
    if fmt == "fp8":
        bound = _FP8_RELATIVE * weight.abs() + _FP8_SUBNORMAL_STEP * absmax
    else:
        bound = _HALF_STEP[fmt] * absmax
    assert (error <= bound * 1.0001 + 1e-12).all()
    assert torch.equal(restored[3], torch.zeros(shape[1]))
    assert (restored - weight).norm() / weight.norm() < _RMS_ERROR[fmt]
    # bf16 compute forms the product in bf16: the scale, the NF4 level and the product each rounded once (2^-8)
    torch.testing.assert_close(dequantize(values, scales, fmt, shape, torch.bfloat16).float(), restored,
                               rtol=3 * 2**-8, atol=1e-9)


def test_nf4_is_bitsandbytes_nf4() -> None:
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(37, 100)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=GROUP_SIZE, quant_type="nf4")
    values, scales = _quantize(weight, "nf4")
    assert torch.equal(dequantize(values, scales, "nf4", (37, 100), torch.float32),
                       bnb_functional.dequantize_4bit(packed, state))


def test_quantized_linear_forward_backward_and_state() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = QuantizedLinear.from_linear(linear, "int8", torch.float32)
    assert isinstance(layer, torch.nn.Linear) and layer.weight is layer.qweight  # the stored values, as bnb's
    assert layer.dequantize(torch.bfloat16).shape == (64, 128)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 128, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias))
    torch.testing.assert_close(out, linear(x), rtol=0, atol=0.02)
    out.square().sum().backward()
    expected = (2 * out.detach()) @ layer.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, expected)
    assert layer.bias.grad is None
    # every piece of state is a plain tensor; a dtype cast moves nothing but the bias
    state = layer.state_dict()
    assert set(state) == {"qweight", "scale", "bias"} and all(type(t) is torch.Tensor for t in state.values())
    layer.to(torch.float16)
    assert (layer.qweight.dtype, layer.scale.dtype, layer.bias.dtype) == (torch.int8, torch.float32, torch.float16)


# ------------------------------------------------------------------------------------------------ the demo


def _inputs(family: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    if family == "flux2":
        return torch.randn(1, 128, 4, 4, generator=g), {"prompt_embeds": torch.randn(1, 8, 48, generator=g)}, None
    text = {"prompt_embeds": torch.randn(1, 8, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    return torch.randn(1, 16, 8, 8, generator=g), text, torch.tensor([3.5])


def _predict(transformer: torch.nn.Module, family: str) -> torch.Tensor:
    from trainer.families import family_ops

    noisy, text, guidance = _inputs(family)
    with torch.no_grad():
        return family_ops(family).predict(transformer, noisy, torch.tensor([0.6]), text, guidance).float()


def _model_class(family: str) -> type:
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    return Flux2Transformer2DModel if family == "flux2" else FluxTransformer2DModel


@pytest.fixture(scope="module")
def bf16_models(demo_dir: Path) -> dict[str, torch.nn.Module]:
    return {family: _model_class(family).from_pretrained(demo_dir / family / "transformer", dtype=torch.bfloat16)
            for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_demo_transformer_at_each_precision(family: str, demo_dir: Path, bf16_models: dict) -> None:
    reference = bf16_models[family]
    expected = _predict(reference, family)
    block_linears = set(quantizable_names(reference))
    assert len(block_linears) == {"flux2": 28, "flux1": 34}[family]
    bf16_bytes = sum(reference.get_submodule(name).weight.nbytes for name in block_linears)
    for fmt in FORMATS:
        model = load_quantized_transformer(demo_dir / family / "transformer", _model_class(family), fmt,
                                           torch.bfloat16)
        quantised = {name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
        assert quantised == block_linears
        # modulation, embedders, norm_out and proj_out stay in the compute dtype
        others = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantised]
        assert others and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in others)
        stored = sum(model.get_submodule(n).qweight.nbytes + model.get_submodule(n).scale.nbytes for n in quantised)
        shapes = [tuple(reference.get_submodule(n).weight.shape) for n in quantised]
        assert stored == sum(storage_bytes(*shape, fmt) for shape in shapes)
        # the demo's 32-wide inputs pad int4 rows to 64, so int4 saves little here; real widths give 0.5625 B
        assert stored < {"fp8": 0.6, "int8": 0.6, "int4": 0.6, "nf4": 0.32}[fmt] * bf16_bytes
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        error = (_predict(model, family) - expected).norm() / expected.norm()
        assert error < _OUTPUT_ERROR[fmt], f"{family} {fmt}: relative error {error:.4f}"


def test_sharded_files_load_the_same(tmp_path: Path, bf16_models: dict) -> None:
    # The same bf16 weights as one file and as shards (the demo's own file is fp32: its weights round to other NF4
    # codes now and then, which says nothing about the sharded loading)
    sharded, single = tmp_path / "transformer", tmp_path / "one_file"
    bf16_models["flux2"].save_pretrained(sharded, max_shard_size="60KB")
    bf16_models["flux2"].save_pretrained(single)
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2 and len(list(single.glob("*.safetensors"))) == 1
    model_class = _model_class("flux2")
    one_file = load_quantized_transformer(single, model_class, "nf4", torch.bfloat16)
    from_shards = load_quantized_transformer(sharded, model_class, "nf4", torch.bfloat16)
    first, second = one_file.state_dict(), from_shards.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert torch.equal(_predict(from_shards, "flux2"), _predict(one_file, "flux2"))


def test_a_folder_that_does_not_fit_is_refused(demo_dir: Path) -> None:
    with pytest.raises(UserError, match=r"model\.source.*FluxTransformer2DModel.*lacks"):
        load_quantized_transformer(demo_dir / "flux2" / "transformer", _model_class("flux1"), "int8", torch.bfloat16)


# ------------------------------------------------------------------------------------------------ adapters


def test_inits_that_rewrite_the_base_are_refused_on_a_quantised_base(demo_dir: Path) -> None:
    from trainer.adapters import add_adapter

    folder, model_class = demo_dir / "flux2" / "transformer", _model_class("flux2")
    kwargs = {"type": "lora", "rank": 8, "alpha": 4.0, "dropout": 0.0, "targets": "tiny"}
    for init in ("pissa", "olora"):
        model = load_quantized_transformer(folder, model_class, "int4", torch.bfloat16)
        with pytest.raises(UserError, match=rf"lora\.init: '{init}'.*model\.base_precision 'int4'"):
            add_adapter(model, "flux2", init=init, base_precision="int4", **kwargs)


@pytest.mark.parametrize(("family", "fmt"), [("flux2", "nf4"), ("flux1", "fp8")])
def test_lora_trains_on_a_quantised_base_and_loads_on_bf16(family: str, fmt: str, demo_dir: Path, tmp_path: Path,
                                                           bf16_models: dict) -> None:
    import diffusers

    from trainer import registry
    from trainer.adapters import adapter_parameters
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    overrides = [f"model.base_precision={fmt}", "train.max_steps=6", "train.learning_rate=0.05", "lora.alpha=8.0",
                 "sample.prompts=[]", "output.save_state=false", f"output.dir='{tmp_path}'"]
    session = Session(resolve_paths(load_spec(demo_dir / JOBS[family], overrides), demo_dir))
    path = session.run()
    transformer = session.transformer
    assert len(session.losses) == 6 and all(torch.isfinite(torch.tensor(session.losses)))
    # FLUX.1's modulation is quantised too: alike under an 8-bit base, in int8 under a 4-bit one
    stored = linear_formats(transformer, fmt, modulation_format(family, fmt, "auto"))
    assert sum(isinstance(m, QuantizedLinear) for m in transformer.modules()) == len(stored)
    assert len(stored) > len(quantizable_names(transformer)) or family == "flux2"
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(transformer))
    assert any(p.abs().sum() > 0 for n, p in transformer.named_parameters() if ".lora_B." in n)
    # the base is untouched: the same bytes as a fresh load
    fresh = load_quantized_transformer(demo_dir / family / "transformer", _model_class(family), fmt, torch.bfloat16)
    for name, module in fresh.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(transformer.get_submodule(name).base_layer.qweight, module.qweight)
    trained = _predict(transformer, family)
    transformer.disable_adapters()
    lora_effect = trained - _predict(transformer, family)
    session.end()

    flavour = registry.get_flavour(family, "demo")
    pipe = getattr(diffusers, flavour.pipeline_class).from_pretrained(demo_dir / family, dtype=torch.bfloat16)
    without = _predict(pipe.transformer, family)
    pipe.load_lora_weights(str(path))
    bf16_effect = _predict(pipe.transformer, family) - without
    # the LoRA changes the bf16 model as it changes the quantised one it was trained on
    cosine = torch.nn.functional.cosine_similarity(bf16_effect.flatten(), lora_effect.flatten(), dim=0)
    ratio = bf16_effect.norm() / lora_effect.norm()
    assert lora_effect.norm() > 0.01 * without.norm()
    assert cosine > 0.9 and 0.75 < ratio < 1.33
