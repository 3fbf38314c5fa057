"""Adapters: target presets on the real module names, inits, LoKr, and continuing from a LoRA file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from trainer.adapters import (
    TARGET_PRESETS,
    adapter_export,
    adapter_parameters,
    add_adapter,
    load_adapter_weights,
    preset_report,
    target_modules,
)
from trainer.errors import UserError

FAMILIES = ("flux2", "flux1")
MODULATION = re.compile(r"(.*\.)?norm[^.]*\.linear|.*_modulation.*")


def make_transformer(family: str, seed: int = 0) -> torch.nn.Module:
    """The demo transformers' shapes (trainer/demo.py), built directly: fixed seed, fp32."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    torch.manual_seed(seed)
    if family == "flux2":
        return Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        )
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )


def real_size_transformers() -> dict[str, torch.nn.Module]:
    """The released models' block layouts (DESIGN.md), on the meta device: names without weights."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    with torch.device("meta"):
        return {
            "flux1": FluxTransformer2DModel(guidance_embeds=True),
            "klein-4b": Flux2Transformer2DModel(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                                attention_head_dim=128, joint_attention_dim=7680,
                                                guidance_embeds=False),
            "klein-9b": Flux2Transformer2DModel(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                                attention_head_dim=128, joint_attention_dim=12288,
                                                guidance_embeds=False),
        }


def forward(transformer: torch.nn.Module, family: str, grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return _forward(transformer, family)


def _forward(transformer: torch.nn.Module, family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tokens, text = 16, 8
    if family == "flux2":
        img_ids = torch.zeros(1, tokens, 4)
        img_ids[0, :, 1], img_ids[0, :, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
        txt_ids = torch.zeros(1, text, 4)
        txt_ids[0, :, 3] = torch.arange(text)
        return transformer(
            hidden_states=torch.randn(1, tokens, 128, generator=g), encoder_hidden_states=torch.randn(1, text, 48,
                                                                                                      generator=g),
            timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False,
        )[0]
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    return transformer(
        hidden_states=torch.randn(1, tokens, 64, generator=g), encoder_hidden_states=torch.randn(1, text, 32,
                                                                                                 generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=img_ids,
        txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]), return_dict=False,
    )[0]


def adapter_kwargs(**overrides: object) -> dict[str, object]:
    kwargs: dict[str, object] = {"type": "lora", "rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": "all",
                                 "init": "default"}
    kwargs.update(overrides)
    return kwargs


def pipeline_class(family: str) -> type:
    from diffusers import Flux2KleinPipeline, FluxPipeline

    return Flux2KleinPipeline if family == "flux2" else FluxPipeline


def save_file(family: str, folder: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Written as diffusers writes it: `transformer.`-prefixed keys via the pipeline's save_lora_weights."""
    pipeline_class(family).save_lora_weights(folder, transformer_lora_layers=state,
                                             transformer_lora_adapter_metadata=metadata)
    return folder / "pytorch_lora_weights.safetensors"


def diffusers_load(family: str, transformer: torch.nn.Module, path: Path) -> None:
    """What `pipe.load_lora_weights(path)` does to the transformer: diffusers' reader, converter and injector."""
    loader = pipeline_class(family)
    state, metadata = loader.lora_state_dict(str(path), return_lora_metadata=True)
    loader.load_lora_into_transformer(state, transformer=transformer, metadata=metadata)


def perturb(transformer: torch.nn.Module, seed: int = 3) -> None:
    """Stand-in for training: move every adapter tensor a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(transformer):
            param.add_(torch.randn(param.shape, generator=g) * 0.05)


# ------------------------------------------------------------------------------------------------ targets


@pytest.fixture(scope="module")
def demo_transformers() -> dict[str, torch.nn.Module]:
    return {family: make_transformer(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_hits_linear_block_modules(demo_transformers, family):
    transformer = demo_transformers[family]
    linears = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for preset in TARGET_PRESETS[family]:
        names = target_modules(transformer, family, preset)
        assert names, preset
        assert set(names) <= linears
        assert not [n for n in names if MODULATION.fullmatch(n)], f"{preset} hits AdaLN modulation"


def test_preset_counts_on_demo_and_real_layouts(demo_transformers):
    assert preset_report(demo_transformers["flux2"], "flux2") == {"all": 28, "attention": 20, "mlp": 8, "tiny": 6}
    assert preset_report(demo_transformers["flux1"], "flux1") == {
        "all": 34, "attention": 24, "mlp": 10, "tiny": 6, "mmdit": 24, "context": 8, "all+ffs": 35, "context+ffs": 12,
    }
    real = real_size_transformers()
    assert preset_report(real["klein-4b"], "flux2") == {"all": 100, "attention": 80, "mlp": 20, "tiny": 15}
    assert preset_report(real["klein-9b"], "flux2") == {"all": 144, "attention": 112, "mlp": 32, "tiny": 24}
    assert preset_report(real["flux1"], "flux1") == {
        "all": 418, "attention": 304, "mlp": 114, "tiny": 57, "mmdit": 228, "context": 76, "all+ffs": 419,
        "context+ffs": 114,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_relate_as_documented(demo_transformers, family):
    transformer = demo_transformers[family]
    sets = {preset: set(target_modules(transformer, family, preset)) for preset in TARGET_PRESETS[family]}
    block_linears = {
        n for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and re.match(r"(single_)?transformer_blocks\.", n)
        and not MODULATION.fullmatch(n)
    }
    assert sets["all"] == block_linears
    assert not sets["attention"] & sets["mlp"]
    assert sets["attention"] | sets["mlp"] == sets["all"]
    assert sets["tiny"] < sets["attention"] < sets["all"]
    assert all(n.startswith("transformer_blocks.") for n in sets["tiny"])
    if family == "flux2":
        assert not [n for n in sets["mlp"] if n.startswith("single_")]  # fused single-block layers count as attention
        assert {n for n in sets["attention"] if n.startswith("single_")} == {
            f"single_transformer_blocks.{i}.attn.{p}" for i in (0, 1) for p in ("to_qkv_mlp_proj", "to_out")
        }
    else:
        assert sets["mmdit"] == {n for n in sets["all"] if n.startswith("transformer_blocks.")}
        assert sets["context"] < sets["context+ffs"] < sets["mmdit"]
        assert all(".add_" in n or "to_add_out" in n for n in sets["context"])
        assert {n.split(".", 2)[2] for n in sets["context+ffs"] - sets["context"]} == {
            "ff_context.net.0.proj", "ff_context.net.2",
        }
        assert sets["all+ffs"] - sets["all"] == {"proj_out"}


def test_preset_names_are_readable_without_torch():
    """The spec and the UI list presets; importing them must not cost a torch import."""
    import subprocess
    import sys

    from conftest import ROOT, python_env

    code = "import sys, trainer.adapters as a; assert 'torch' not in sys.modules; print(a.TARGET_PRESETS['flux2'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=python_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "attention" in out.stdout


def test_regex_targets(demo_transformers):
    transformer = demo_transformers["flux2"]
    assert target_modules(transformer, "flux2", r"transformer_blocks\.\d+\.attn\.to_(q|v)") == [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_v",
    ]
    with pytest.raises(UserError, match=r"lora\.targets.*transformer_blocks\.0\.attn\.to_q"):
        target_modules(transformer, "flux2", r"attn\.to_q")  # must match the whole name
    with pytest.raises(UserError, match=r"lora\.targets.*not a valid regular expression|lora\.targets.*neither"):
        target_modules(transformer, "flux2", "to_q(")
    with pytest.raises(UserError, match=r"lora\.targets: 'mmdit' is a FLUX\.1 preset"):
        target_modules(transformer, "flux2", "mmdit")


# ------------------------------------------------------------------------------------------------ adding


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_is_trainable_and_fp32(family):
    transformer = make_transformer(family).to(torch.bfloat16)
    names = add_adapter(transformer, family, **adapter_kwargs(targets="attention"))
    assert names == target_modules(transformer, family, "attention")  # names survive the peft wrapping
    trainable = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n, _ in trainable)
    assert len(trainable) == 2 * len(names)
    assert all(p.dtype == torch.float32 for _, p in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in transformer.named_parameters() if not p.requires_grad)
    # peft may condense the config's target_modules into suffixes; the wrapped layers are exactly `names`
    wrapped = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(names)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_zero_b_inits_keep_the_output(family, init):
    transformer = make_transformer(family)
    before = forward(transformer, family)
    add_adapter(transformer, family, **adapter_kwargs(init=init))
    assert torch.equal(forward(transformer, family), before)
    lora_a = transformer.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    if init == "gaussian":  # peft's gaussian: A ~ N(0, 1/rank), B = 0
        assert abs(lora_a.std().item() - 1 / 4) < 0.05  # peft's default (Kaiming) would give ~0.10 here
    perturb(transformer)
    assert not torch.allclose(forward(transformer, family), before, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_rewrite_the_base_but_keep_the_output(family, init):
    transformer = make_transformer(family)
    before = forward(transformer, family)
    original = transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    add_adapter(transformer, family, **adapter_kwargs(init=init))
    layer = transformer.transformer_blocks[0].attn.to_q
    assert not torch.allclose(layer.base_layer.weight, original)  # the base holds W - BA now
    assert layer.lora_B["default"].weight.abs().sum() > 0  # B is not zero: the adapter starts "in" the weights
    torch.testing.assert_close(forward(transformer, family), before, atol=1e-4, rtol=0)


def test_pissa_is_deterministic_for_exact_resume():
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs))  # the caller's RNG must not matter
        transformer = make_transformer("flux2")
        add_adapter(transformer, "flux2", **adapter_kwargs(init="pissa", targets="tiny"))
        runs.append({k: v.detach().clone() for k, v in transformer.state_dict().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_pissa_needs_a_float_base():
    with pytest.raises(UserError, match=r"lora\.init.*pissa.*model\.base_precision"):
        add_adapter(make_transformer("flux2"), "flux2", **adapter_kwargs(init="pissa"), base_precision="nf4")


@pytest.mark.parametrize("family", FAMILIES)
def test_lokr_starts_neutral_and_trains(family):
    transformer = make_transformer(family)
    before = forward(transformer, family)
    add_adapter(transformer, family, **adapter_kwargs(type="lokr", rank=4, alpha=4.0, targets="attention"))
    params = adapter_parameters(transformer)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert all(".lokr_" in n for n, p in transformer.named_parameters() if p.requires_grad)
    assert torch.equal(forward(transformer, family), before)
    optimiser = torch.optim.AdamW(params, lr=1e-2)
    forward(transformer, family, grad=True).square().mean().backward()
    optimiser.step()
    assert not torch.allclose(forward(transformer, family), before, atol=1e-6)


# ------------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_a_diffusers_file(family, tmp_path):
    from peft.utils import get_peft_model_state_dict

    trained = make_transformer(family)
    add_adapter(trained, family, **adapter_kwargs(targets="attention"))
    perturb(trained)
    expected = forward(trained, family)
    path = save_file(family, tmp_path, get_peft_model_state_dict(trained))

    fresh = make_transformer(family)
    add_adapter(fresh, family, **adapter_kwargs(targets="attention"), init_from=str(path))
    assert torch.equal(forward(fresh, family), expected)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter_parameters(fresh))


def test_a_foreign_layout_goes_through_the_diffusers_converter(tmp_path):
    """ai-toolkit writes `diffusion_model.`-prefixed keys; diffusers' FLUX.2 converter maps them, we load the result."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file as save_safetensors

    trained = make_transformer("flux2")
    add_adapter(trained, "flux2", **adapter_kwargs())
    perturb(trained)
    path = tmp_path / "ai_toolkit.safetensors"
    save_safetensors({f"diffusion_model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(trained).items()},
                     str(path))
    fresh = make_transformer("flux2")
    add_adapter(fresh, "flux2", **adapter_kwargs(), init_from=str(path))
    assert torch.equal(forward(fresh, "flux2"), forward(trained, "flux2"))


def test_another_alpha_keeps_the_files_update(tmp_path):
    trained = make_transformer("flux2")
    add_adapter(trained, "flux2", **adapter_kwargs(rank=4, alpha=16.0))
    perturb(trained)
    expected = forward(trained, "flux2")
    path = save_file("flux2", tmp_path, *adapter_export(trained))  # with metadata: alpha 16

    fresh = make_transformer("flux2")
    add_adapter(fresh, "flux2", **adapter_kwargs(rank=4, alpha=4.0), init_from=str(path))
    torch.testing.assert_close(forward(fresh, "flux2"), expected, atol=1e-5, rtol=0)


def test_a_file_without_metadata_loads_as_diffusers_reads_it(tmp_path):
    """No alpha stored: diffusers takes alpha = rank, so do we, whatever the job's lora.alpha."""
    from peft.utils import get_peft_model_state_dict

    trained = make_transformer("flux2")
    add_adapter(trained, "flux2", **adapter_kwargs(rank=4, alpha=8.0, targets="tiny"))
    perturb(trained)
    path = save_file("flux2", tmp_path, get_peft_model_state_dict(trained))
    reference = make_transformer("flux2")
    diffusers_load("flux2", reference, path)

    fresh = make_transformer("flux2")
    add_adapter(fresh, "flux2", **adapter_kwargs(rank=4, alpha=8.0, targets="tiny"), init_from=str(path))
    torch.testing.assert_close(forward(fresh, "flux2"), forward(reference, "flux2"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter_type", ["lora", "lokr"])
def test_diffusers_reads_our_export(adapter_type, tmp_path):
    """diffusers' own loader (not ours) gives the trained output from the exported file, LoKr included."""
    trained = make_transformer("flux2")
    add_adapter(trained, "flux2", **adapter_kwargs(type=adapter_type, rank=4, alpha=8.0, targets="attention"))
    perturb(trained)
    path = save_file("flux2", tmp_path, *adapter_export(trained))
    reference = make_transformer("flux2")
    diffusers_load("flux2", reference, path)
    torch.testing.assert_close(forward(reference, "flux2"), forward(trained, "flux2"), atol=1e-5, rtol=0)

    ours = make_transformer("flux2")
    add_adapter(ours, "flux2", **adapter_kwargs(type=adapter_type, rank=4, alpha=8.0, targets="attention"),
                init_from=str(path))
    torch.testing.assert_close(forward(ours, "flux2"), forward(trained, "flux2"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rewritten_base_exports_against_the_original_base(init, tmp_path):
    trained = make_transformer("flux2")
    add_adapter(trained, "flux2", **adapter_kwargs(init=init, rank=4, alpha=8.0, targets="attention"))
    perturb(trained)
    state, metadata = adapter_export(trained)
    assert metadata["r"] == 8 and metadata["lora_alpha"] == 16.0 and metadata["init_lora_weights"] is True
    path = save_file("flux2", tmp_path, state, metadata)

    reference = make_transformer("flux2")  # the user's unmodified base
    original = reference.transformer_blocks[0].attn.to_q.weight.detach().clone()
    diffusers_load("flux2", reference, path)
    assert torch.equal(reference.transformer_blocks[0].attn.to_q.base_layer.weight, original)  # no PiSSA on load
    torch.testing.assert_close(forward(reference, "flux2"), forward(trained, "flux2"), atol=1e-4, rtol=0)


def test_mismatched_files_are_refused(tmp_path):
    from peft.utils import get_peft_model_state_dict

    rank8 = make_transformer("flux2")
    add_adapter(rank8, "flux2", **adapter_kwargs(rank=8, alpha=8.0))
    rank8_file = save_file("flux2", tmp_path / "rank8", get_peft_model_state_dict(rank8))
    with pytest.raises(UserError, match=r"lora\.init_from: .*rank 8 and lora\.rank is 4"):
        add_adapter(make_transformer("flux2"), "flux2", **adapter_kwargs(), init_from=str(rank8_file))

    flux1 = make_transformer("flux1")
    add_adapter(flux1, "flux1", **adapter_kwargs())
    flux1_file = save_file("flux1", tmp_path / "flux1", get_peft_model_state_dict(flux1))
    with pytest.raises(UserError, match=r"lora\.init_from: .*not in this transformer .*another model family"):
        add_adapter(make_transformer("flux2"), "flux2", **adapter_kwargs(), init_from=str(flux1_file))

    tiny = make_transformer("flux2")
    add_adapter(tiny, "flux2", **adapter_kwargs(targets="tiny"))
    tiny_file = save_file("flux2", tmp_path / "tiny", get_peft_model_state_dict(tiny))
    with pytest.raises(UserError, match=r"lora\.init_from: .*lacks 22 of the 28 modules lora\.targets selects"):
        add_adapter(make_transformer("flux2"), "flux2", **adapter_kwargs(), init_from=str(tiny_file))
    with pytest.raises(UserError, match=r"lora\.init_from: .*also trains 22 modules outside lora\.targets"):
        load_adapter_weights(_with_adapter("tiny"), str(save_file("flux2", tmp_path / "all",
                                                                   get_peft_model_state_dict(_with_adapter("all")))))
    with pytest.raises(UserError, match=r"lora\.init_from: .*holds a LoRA adapter and lora\.type is 'lokr'"):
        add_adapter(make_transformer("flux2"), "flux2", **adapter_kwargs(type="lokr", targets="tiny"),
                    init_from=str(tiny_file))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match=r"lora\.init_from: .* is not a readable safetensors file"):
        add_adapter(make_transformer("flux2"), "flux2", **adapter_kwargs(), init_from=str(garbage))
    with pytest.raises(UserError, match=r"lora\.init_from: .* is not a file"):
        add_adapter(make_transformer("flux2"), "flux2", **adapter_kwargs(), init_from=str(tmp_path / "no.safetensors"))


def _with_adapter(targets: str) -> torch.nn.Module:
    transformer = make_transformer("flux2")
    add_adapter(transformer, "flux2", **adapter_kwargs(targets=targets))
    return transformer


def test_flavour_preset_counts_from_registry_facts_alone() -> None:
    from trainer.adapters import flavour_preset_counts

    klein = flavour_preset_counts("flux2", "klein-base-9b")
    assert klein == {"all": 144, "attention": 112, "mlp": 32, "tiny": 24}
    flux1 = flavour_preset_counts("flux1", "dev")
    assert flux1["all"] == 418 and flux1["mmdit"] == 228 and flux1["all+ffs"] == 419
    assert all(count > 0 for count in flux1.values())
