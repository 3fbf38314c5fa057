"""The real configurations of each flavour's components, built on the meta device (no memory, any size).

Widths and depths come from the registry's flavour (the transformer) and from the released models' config.json
files (the text encoders and VAEs; values below). `small_encoders` swaps the text encoders and the VAE for tiny
ones of the same classes whose output widths still fit the flavour's transformer: the real-width CI test builds
a transformer of real widths with one double and one single block beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.registry import Flavour

# Released configs (hub config.json): Qwen3-4B / Qwen3-8B, T5-XXL v1.1 (FLUX.1's text_encoder_2), CLIP ViT-L/14's
# text tower, Mistral-Small-3.1-24B (text and Pixtral image tower).
QWEN3 = {2560: dict(intermediate_size=9728, tie_word_embeddings=True),
         4096: dict(intermediate_size=12288, tie_word_embeddings=False)}
QWEN3_COMMON = dict(vocab_size=151936, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, tie_word_embeddings=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
MISTRAL_TEXT = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=1_000_000_000.0)
PIXTRAL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, head_dim=64,
               image_size=1540, patch_size=14)
FLUX1_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
SMALL_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
SMALL_TEXT_LAYERS = 36  # the hidden-state layers FLUX.2 reads (up to 27) must exist

# scheduler/scheduler_config.json of the hub repos. FLUX.2 pipelines compute mu themselves and need dynamic shifting.
FLUX2_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
FLUX1_DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                       "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX1_SCHNELL_SCHEDULER = {**FLUX1_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


@dataclass
class Component:
    """One pipeline component: its folder name, library and class, the model on the meta device, and the tensors
    a saved copy holds (tied weights once, non-persistent buffers not at all)."""

    name: str  # transformer, vae, text_encoder, text_encoder_2
    library: str  # diffusers or transformers
    class_name: str
    model: Any
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)


def _saved_tensors(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    kept = set(model.state_dict())
    # tied weights (T5's encoder embedding, a tied language-model head) are saved once, as save_pretrained does
    kept -= set(getattr(model, "all_tied_weights_keys", None) or {})
    result = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters() if name in kept}
    result.update({name: (tuple(b.shape), b.dtype) for name, b in model.named_buffers() if name in kept})
    return {name: (shape, torch.bfloat16 if dtype.is_floating_point else dtype) for name, (shape, dtype)
            in result.items()}


def _meta(build: Any) -> Any:  # noqa: ANN401 - any module
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def transformer(flavour: Flavour, pooled_dim: int = 768) -> Component:
    import diffusers

    cls = getattr(diffusers, flavour.transformer_class)
    common = dict(num_layers=flavour.double_blocks, num_single_layers=flavour.single_blocks,
                  attention_head_dim=flavour.head_dim, num_attention_heads=flavour.num_heads,
                  joint_attention_dim=flavour.joint_attention_dim, guidance_embeds=flavour.guidance == "embedded")
    if flavour.family == "flux1":
        common.update(pooled_projection_dim=pooled_dim, axes_dims_rope=(16, 56, 56))
    model = _meta(lambda: cls(**common))
    return Component("transformer", "diffusers", flavour.transformer_class, model, _saved_tensors(model))


def vae(flavour: Flavour, small: bool) -> Component:
    import diffusers

    cls = getattr(diffusers, flavour.vae_class)
    config = dict(FLUX1_VAE) if flavour.family == "flux1" else {}
    if small:
        config.update(SMALL_VAE)
    model = _meta(lambda: cls(**config))
    return Component("vae", "diffusers", flavour.vae_class, model, _saved_tensors(model))


def text_encoders(flavour: Flavour, small: bool, tokenizers: dict[str, Any]) -> list[Component]:
    """The flavour's text encoders at their released sizes (or tiny, `small`), vocabularies real either way
    unless small: the small tokenizers' ids stay below them."""
    import transformers

    result = []
    for index, class_name in enumerate(flavour.text_encoders):
        slot = "text_encoder" if index == 0 else "text_encoder_2"
        config = _text_config(flavour, class_name, small, tokenizers[slot.replace("text_encoder", "tokenizer")])
        cls = getattr(transformers, class_name)
        model = _meta(lambda cls=cls, config=config: cls(config))
        config.architectures = [class_name]
        config.dtype = "bfloat16"
        result.append(Component(slot, "transformers", class_name, model, _saved_tensors(model)))
    return result


def _text_config(flavour: Flavour, class_name: str, small: bool, tokenizer: Any) -> Any:  # noqa: ANN401
    import transformers

    width = flavour.joint_attention_dim // max(1, len(flavour.text_encoder_layers))
    if class_name == "Qwen3ForCausalLM":
        if small:
            return transformers.Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=SMALL_TEXT_LAYERS, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                                            tie_word_embeddings=True)
        return transformers.Qwen3Config(hidden_size=width, **QWEN3[width], **QWEN3_COMMON)
    if class_name == "Mistral3ForConditionalGeneration":
        text = dict(MISTRAL_TEXT)
        vision = dict(PIXTRAL)
        if small:
            text.update(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048)
            vision.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          head_dim=8, image_size=32, patch_size=16)
        return transformers.Mistral3Config(
            text_config=transformers.MistralConfig(**text), vision_config=transformers.PixtralVisionConfig(**vision),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
            multimodal_projector_bias=False)
    if class_name == "CLIPTextModel":
        # CLIP-L even when small: FLUX.1's pooled input is 768 wide for every non-demo flavour
        return transformers.CLIPTextConfig(**CLIP_L, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t5 = dict(T5_XXL)
    if small:
        t5.update(vocab_size=len(tokenizer), d_model=flavour.joint_attention_dim, d_kv=8, d_ff=64, num_layers=2,
                  num_heads=2)
    return transformers.T5Config(**t5, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def pipeline_components(flavour: Flavour, small_encoders: bool, tokenizers: dict[str, Any]) -> list[Component]:
    """Every weighted component of the flavour's pipeline: transformer, VAE, text encoder(s)."""
    return [transformer(flavour), vae(flavour, small_encoders), *text_encoders(flavour, small_encoders, tokenizers)]


def scheduler_config(flavour: Flavour) -> dict[str, Any]:
    if flavour.family == "flux2":
        return FLUX2_SCHEDULER
    return FLUX1_SCHNELL_SCHEDULER if flavour.timestep_shift == "fixed" else FLUX1_DEV_SCHEDULER
