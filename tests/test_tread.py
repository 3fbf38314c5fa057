"""TREAD token routing on tiny FLUX.2 and FLUX.1 transformers (2 double + 6 single blocks), through the
families' own `predict`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from trainer.tread import TreadConfig, kept_token_count, transformer_blocks, tread_routing, validate_tread

DOUBLE, SINGLE = 2, 6
TOTAL = DOUBLE + SINGLE
BATCH, TEXT_TOKENS, IMAGE_TOKENS = 2, 6, 16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_qkv_mlp_proj"]  # in the double and single blocks of both families


@dataclass
class Family:
    name: str
    transformer: Any
    predict: Any
    noisy: torch.Tensor
    sigmas: torch.Tensor
    text: dict[str, torch.Tensor]
    guidance: torch.Tensor | None

    def __call__(self) -> torch.Tensor:
        return self.predict(self.transformer, self.noisy, self.sigmas, self.text, self.guidance)


def _flux2(lora: bool) -> Family:
    from diffusers import Flux2Transformer2DModel

    from trainer.families import flux2

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    text = {"prompt_embeds": torch.randn(BATCH, TEXT_TOKENS, 48)}
    return _finish(Family("flux2", transformer, flux2.predict, torch.randn(BATCH, 128, 4, 4),
                          torch.rand(BATCH), text, None), lora)


def _flux1(lora: bool) -> Family:
    from diffusers import FluxTransformer2DModel

    from trainer.families import flux1

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    text = {"prompt_embeds": torch.randn(BATCH, TEXT_TOKENS, 32), "pooled_prompt_embeds": torch.randn(BATCH, 32)}
    return _finish(Family("flux1", transformer, flux1.predict, torch.randn(BATCH, 16, 8, 8),  # 2x2 packed: 16
                          torch.rand(BATCH), text, torch.full((BATCH,), 3.5)), lora)


def _finish(family: Family, lora: bool) -> Family:
    if lora:
        from peft import LoraConfig

        family.transformer.requires_grad_(False)
        # Random A and B so every adapter weight gets a gradient from the first step.
        family.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS,
                                                  init_lora_weights=False))
    family.transformer.train()
    return family


BUILDERS = {"flux2": _flux2, "flux1": _flux1}


@pytest.fixture(params=sorted(BUILDERS))
def family_name(request: pytest.FixtureRequest) -> str:
    return request.param


def _config(ratio: float = 0.5, start: int = 1, end: int = 4) -> TreadConfig:
    return TreadConfig(selection_ratio=ratio, start_block=start, end_block=end)


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _record_attention(family: Family) -> tuple[list[dict[str, int]], list[Any]]:
    """Per attention call, in order: image and text tokens it sees and its RoPE rows (FLUX.2's single blocks and
    FLUX.1's see one joint sequence whose first TEXT_TOKENS rows are the text)."""
    calls: list[dict[str, int]] = []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        hidden, encoder = bound["hidden_states"], bound.get("encoder_hidden_states")
        if encoder is None:  # joint stream
            calls.append({"text": TEXT_TOKENS, "image": hidden.shape[1] - TEXT_TOKENS,
                          "rope": bound["image_rotary_emb"][0].shape[0]})
        else:
            calls.append({"text": encoder.shape[1], "image": hidden.shape[1],
                          "rope": bound["image_rotary_emb"][0].shape[0]})

    handles = [block.attn.register_forward_pre_hook(hook, with_kwargs=True)
               for block in transformer_blocks(family.transformer)]
    return calls, handles


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("config", "keys"), [
    (_config(0.5, 3, 2), ["advanced.tread_start_block"]),
    (_config(0.5, 2, TOTAL), ["advanced.tread_end_block"]),
    (_config(0.5, TOTAL, TOTAL + 1), ["advanced.tread_start_block", "advanced.tread_end_block"]),
    (_config(0.5, -TOTAL - 1, 2), ["advanced.tread_start_block"]),
    (_config(1.0, 1, 4), ["advanced.tread_selection_ratio"]),
    (_config(-0.1, 1, 4), ["advanced.tread_selection_ratio"]),
    (_config(1.5, 5, 4), ["advanced.tread_selection_ratio", "advanced.tread_start_block"]),
])
def test_validate_tread_names_each_bad_key(config: TreadConfig, keys: list[str]) -> None:
    problems = validate_tread(config, TOTAL)
    assert len(problems) == len(keys)
    for problem, key in zip(problems, keys, strict=True):
        assert key in problem


@pytest.mark.parametrize("config", [_config(0.0, 0, 0), _config(0.5, 0, TOTAL - 1), _config(0.99, 2, -2),
                                    _config(0.5, -TOTAL, -1)])
def test_validate_tread_accepts_spans_inside_the_model(config: TreadConfig) -> None:
    assert validate_tread(config, TOTAL) == []


def test_tread_routing_refuses_an_invalid_config() -> None:
    family = _flux2(lora=False)
    with pytest.raises(ValueError, match="advanced.tread_end_block"), \
            tread_routing(family.transformer, _config(0.5, 1, TOTAL), _seeded()):
        pass


def test_kept_token_count_keeps_the_complement_and_at_least_one() -> None:
    assert kept_token_count(16, 0.5) == 8
    assert kept_token_count(16, 0.0) == 16
    assert kept_token_count(10, 0.75) == 3
    assert kept_token_count(4, 0.99) == 1


# ---------------------------------------------------------------- what the span sees


def test_ratio_zero_is_the_plain_forward(family_name: str) -> None:
    family = BUILDERS[family_name](lora=False)
    with torch.no_grad():
        plain = family()
        with tread_routing(family.transformer, _config(0.0, 0, TOTAL - 1), _seeded()):
            routed = family()
    assert torch.equal(plain, routed)


@pytest.mark.parametrize(("start", "end"), [(1, 4), (0, 1), (3, -2), (-1, -1)])
def test_span_blocks_see_the_kept_image_tokens_and_every_text_token(family_name: str, start: int, end: int) -> None:
    family = BUILDERS[family_name](lora=False)
    kept = kept_token_count(IMAGE_TOKENS, 0.5)
    calls, handles = _record_attention(family)
    with torch.no_grad(), tread_routing(family.transformer, _config(0.5, start, end), _seeded()):
        family()
    for handle in handles:
        handle.remove()
    span = range(start % TOTAL, end % TOTAL + 1)
    assert [c["image"] for c in calls] == [kept if i in span else IMAGE_TOKENS for i in range(TOTAL)]
    assert all(c["text"] == TEXT_TOKENS for c in calls)
    assert all(c["rope"] == c["text"] + c["image"] for c in calls)


def test_eval_mode_is_never_routed(family_name: str) -> None:
    family = BUILDERS[family_name](lora=False)
    family.transformer.eval()
    generator = _seeded()
    state = generator.get_state()
    with torch.no_grad():
        plain = family()
        calls, handles = _record_attention(family)
        with tread_routing(family.transformer, _config(0.5, 0, TOTAL - 1), generator):
            evaluated = family()
    for handle in handles:
        handle.remove()
    assert torch.equal(plain, evaluated)
    assert all(c["image"] == IMAGE_TOKENS for c in calls)
    assert torch.equal(generator.get_state(), state)  # nothing drawn


def test_routing_ends_with_the_block(family_name: str) -> None:
    family = BUILDERS[family_name](lora=False)
    with torch.no_grad():
        plain = family()
        with tread_routing(family.transformer, _config(0.5, 1, 4), _seeded()):
            routed = family()
        after = family()
    assert not torch.equal(plain, routed)
    assert torch.equal(plain, after)
    transformer = family.transformer
    for module in [transformer, *transformer_blocks(transformer)]:
        assert not module._forward_pre_hooks and not module._forward_hooks


@pytest.mark.parametrize(("start", "end"), [(1, 4), (0, 1), (3, 7), (5, 5)])
def test_routed_tokens_bypass_the_span_and_kept_tokens_run_it_at_their_positions(
        family_name: str, start: int, end: int) -> None:
    """Against a manual computation: the span's blocks run by hand on the kept tokens, with the RoPE rows of
    their true positions; the routed tokens leave the span exactly as they entered it."""
    family = BUILDERS[family_name](lora=False)
    blocks = transformer_blocks(family.transformer)
    entered: dict[int, dict[str, Any]] = {}
    left: list[Any] = []

    def record_input(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:  # registered first: sees the unrouted call
            entered[index] = dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
        return hook

    handles = [blocks[i].register_forward_pre_hook(record_input(i), with_kwargs=True) for i in range(start, end + 1)]
    with torch.no_grad(), tread_routing(family.transformer, _config(0.5, start, end), _seeded()):
        # registered after the routing's own hooks: sees the span's output with the routed tokens put back
        handles.append(blocks[end].register_forward_hook(lambda module, args, output: left.append(output)))
        family()
    for handle in handles:
        handle.remove()

    def split(stream: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return stream if isinstance(stream, tuple) else (stream[:, :TEXT_TOKENS], stream[:, TEXT_TOKENS:])

    first = entered[start]
    if first["encoder_hidden_states"] is None:
        text, image_in = split(first["hidden_states"])
    else:
        text, image_in = first["encoder_hidden_states"], first["hidden_states"]
    image_out = split(left[0])[1]
    assert image_in.shape == image_out.shape == (BATCH, IMAGE_TOKENS, image_in.shape[-1])
    unchanged = torch.tensor([torch.equal(image_in[:, j], image_out[:, j]) for j in range(IMAGE_TOKENS)])
    kept = (~unchanged).nonzero().flatten()
    assert len(kept) == kept_token_count(IMAGE_TOKENS, 0.5)

    rows = torch.cat([torch.arange(TEXT_TOKENS), TEXT_TOKENS + kept])
    image = image_in[:, kept]
    with torch.no_grad():
        for index in range(start, end + 1):
            call = dict(entered[index])
            call["image_rotary_emb"] = tuple(table[rows] for table in call["image_rotary_emb"])
            if call["encoder_hidden_states"] is None:  # FLUX.2 single block: one joint stream
                call["hidden_states"] = torch.cat([text, image], dim=1)
            else:
                call["hidden_states"], call["encoder_hidden_states"] = image, text
            text, image = split(blocks[index](**call))
    torch.testing.assert_close(image_out[:, kept], image, rtol=0, atol=1e-6)


def test_identity_span_leaves_the_output_unchanged(family_name: str) -> None:
    """With the span's blocks made identities (output projections zeroed), routing is invisible: the routed
    tokens are put back where they came from and the kept ones keep their order."""
    family = BUILDERS[family_name](lora=False)
    start, end = 1, 4
    with torch.no_grad():
        for block in transformer_blocks(family.transformer)[start:end + 1]:
            for name, param in block.named_parameters():
                if any(part in name for part in ("to_out", "to_add_out", "ff.", "ff_context.", "proj_out")):
                    param.zero_()
        plain = family()
        with tread_routing(family.transformer, _config(0.5, start, end), _seeded()):
            routed = family()
    torch.testing.assert_close(routed, plain, rtol=0, atol=1e-6)


def test_same_seed_same_output_other_seed_other_tokens(family_name: str) -> None:
    family = BUILDERS[family_name](lora=False)
    outputs = []
    with torch.no_grad():
        for seed in (0, 0, 1):
            with tread_routing(family.transformer, _config(0.5, 1, 4), _seeded(seed)):
                outputs.append(family())
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_one_draw_per_forward_continues_the_generator(family_name: str) -> None:
    family = BUILDERS[family_name](lora=False)
    generator = _seeded()
    with torch.no_grad(), tread_routing(family.transformer, _config(0.5, 1, 4), generator):
        first, second = family(), family()
    assert not torch.equal(first, second)  # a fresh kept set for the second forward


# ---------------------------------------------------------------- training: gradients and checkpointing


def _lora_step(family: Family, checkpointing: bool, forwards: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    transformer = family.transformer
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.zero_grad(set_to_none=True)
    with tread_routing(transformer, _config(0.5, 1, 4), _seeded()):
        # Several forwards before one backward: each recomputation must find its own forward's tokens.
        loss = sum(family().pow(2).mean() for _ in range(forwards))
        loss.backward()
    grads = {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}
    return loss.item(), grads


def test_gradients_reach_lora_inside_and_outside_the_span(family_name: str) -> None:
    family = BUILDERS[family_name](lora=True)
    _, grads = _lora_step(family, checkpointing=False)
    # span 1..4: double block 0 before it, double block 1 and single blocks 0..2 in it, single 3..5 after it
    for prefix in ("transformer_blocks.0.", "transformer_blocks.1.", "single_transformer_blocks.0.",
                   "single_transformer_blocks.2.", "single_transformer_blocks.5."):
        block_grads = [g for n, g in grads.items() if n.startswith(prefix) and "lora_" in n]
        assert block_grads, prefix
        assert all(g.abs().sum() > 0 for g in block_grads), prefix


@pytest.mark.parametrize("forwards", [1, 2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family_name: str, forwards: int) -> None:
    family = BUILDERS[family_name](lora=True)
    loss_plain, grads_plain = _lora_step(family, checkpointing=False, forwards=forwards)
    loss_checkpointed, grads_checkpointed = _lora_step(family, checkpointing=True, forwards=forwards)
    assert abs(loss_plain - loss_checkpointed) <= 1e-6
    assert grads_plain.keys() == grads_checkpointed.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpointing_is_refused() -> None:
    from torch.utils.checkpoint import checkpoint

    family = _flux2(lora=True)
    family.transformer.enable_gradient_checkpointing(
        lambda module, *args: checkpoint(module.__call__, *args, use_reentrant=True))
    with pytest.raises(RuntimeError, match="non-reentrant"), \
            tread_routing(family.transformer, _config(0.5, 1, 4), _seeded()):
        family()
