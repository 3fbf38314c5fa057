"""VAE tensor names: BFL's (the ldm layout of ae.safetensors and flux2-vae.safetensors) against diffusers'.

FLUX.1's ae.safetensors is the ldm autoencoder layout diffusers already reads: `convert_ldm_vae_checkpoint`
(diffusers 0.42, single_file_utils) converts it, attention 1x1 convolutions to linears included. The FLUX.2 VAE
has the same encoder and decoder plus two things that converter does not know, handled here:
  - its 1x1 quant convolutions live inside the encoder/decoder (`encoder.quant_conv`, `decoder.post_quant_conv`,
    as ComfyUI's loader also expects them) where diffusers' AutoencoderKLFlux2 has them at the top;
  - `bn.*`: the BatchNorm of the 2x2-patchified latents (running mean/var), the same name on both sides.
The inverse (`vae_diffusers_to_ldm`) is written here for tests and exports; no library offers it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

_FLUX2_QUANT = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


def vae_ldm_to_diffusers(state_dict: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """An ldm/BFL-layout VAE state dict (prefix stripped) in diffusers names, for a model with `config`."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    renamed: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("bn."):
            extras[key] = tensor
            continue
        for old, new in _FLUX2_QUANT.items():
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = tensor
    converted = convert_ldm_vae_checkpoint(renamed, config)
    return {**converted, **extras}


def _ldm_name(name: str, up_blocks: int) -> str:
    """The ldm name of one diffusers VAE tensor name."""
    for side in ("encoder", "decoder"):
        name = name.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    # diffusers counts the decoder's up blocks from the bottom of the U, ldm from the top
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                  lambda m: f"decoder.up.{up_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"decoder.up.{up_blocks - 1 - int(m.group(1))}.upsample.", name)
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", name)
    name = name.replace("conv_shortcut.", "nin_shortcut.")
    attention = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    match = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name)
    if match:
        rest = match.group(2)
        for old, new in attention.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
        name = f"{match.group(1)}.mid.attn_1.{rest}"
    return name


def vae_diffusers_to_ldm(state_dict: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """A diffusers VAE state dict in the layout BFL ships (ae.safetensors / flux2-vae.safetensors): ldm names,
    attention projections as 1x1 convolutions, FLUX.2's quant convolutions inside the encoder/decoder."""
    up_blocks = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        name = _ldm_name(key, up_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and not name.endswith("norm.weight"):
            tensor = tensor[:, :, None, None]  # ldm's attention uses 1x1 convolutions
        if family == "flux2":
            for inner, top in _FLUX2_QUANT.items():
                if name.startswith(top):
                    name = inner + name[len(top):]
        out[name] = tensor.contiguous()
    return out
