"""A FLUX transformer's architecture (blocks, width, heads, joint dimension, guidance embedding, input channels)
against the flavour a job names: read from a diffusers `config.json` or from a single file's header shapes, and
told back to people as "FLUX.2 [klein] base 4B: 5 + 20 blocks, width 3072".

The registry's facts are the reference; a model of another architecture under a flavour's name would train an
adapter of the wrong shape, be estimated for the wrong size and be labelled as a model it is not. Standard
library only (the UI and the preflight checks import it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from trainer import registry

# latent channels x the 2x2 patch the transformers take as one token
PATCH_AREA = 4


@dataclass(frozen=True)
class Architecture:
    """What a transformer is built as; 0 (or None for guidance) where the source does not say."""

    family: str
    double_blocks: int
    single_blocks: int
    width: int
    heads: int = 0
    joint_dim: int = 0
    guidance: bool | None = None
    in_channels: int = 0


def of_flavour(flavour: registry.Flavour) -> Architecture:
    return Architecture(flavour.family, flavour.double_blocks, flavour.single_blocks, flavour.hidden_size,
                        flavour.num_heads, flavour.joint_attention_dim, flavour.guidance == "embedded",
                        flavour.latent_channels * PATCH_AREA)


def of_config(config: dict[str, Any], family: str) -> Architecture:
    """From a diffusers transformer's config.json (Flux2Transformer2DModel / FluxTransformer2DModel keys)."""
    heads, head_dim = int(config.get("num_attention_heads", 0)), int(config.get("attention_head_dim", 0))
    return Architecture(family, int(config.get("num_layers", 0)), int(config.get("num_single_layers", 0)),
                        heads * head_dim, heads, int(config.get("joint_attention_dim", 0)),
                        bool(config.get("guidance_embeds", False)), int(config.get("in_channels", 0)))


def differences(found: Architecture, wanted: Architecture) -> list[str]:
    """The facts in which `found` is not `wanted` (facts `found` does not know are not differences)."""
    return [item.name for item in fields(Architecture) if _known(getattr(found, item.name))
            and getattr(found, item.name) != getattr(wanted, item.name)]


def _known(value: object) -> bool:
    return value is not None and (isinstance(value, bool) or value != 0)


def fitting(found: Architecture) -> list[registry.Flavour]:
    """Every flavour (of any family) whose transformer is built as `found`."""
    return [flavour for family in registry.FAMILIES.values() for flavour in family.flavours.values()
            if not differences(found, of_flavour(flavour))]


def _extras(arch: Architecture, facts: tuple[str, ...]) -> str:
    words = {"heads": f"{arch.heads} heads", "joint_dim": f"joint dimension {arch.joint_dim}",
             "guidance": "with a guidance embedding" if arch.guidance else "no guidance embedding",
             "in_channels": f"{arch.in_channels} input channels"}
    return "".join(f", {words[fact]}" for fact in facts if fact in words)


def describe(arch: Architecture, facts: tuple[str, ...] = (), name: str = "") -> str:
    """'FLUX.2 [klein] base 4B: 5 + 20 blocks, width 3072', named `name` or by the flavours it fits (else its
    family), plus the listed further facts."""
    labels = [flavour.label for flavour in fitting(arch)]
    name = name or " / ".join(labels) or f"a {registry.FAMILIES[arch.family].label} transformer of no known flavour"
    return f"{name}: {shape(arch, facts)}"


def shape(arch: Architecture, facts: tuple[str, ...] = ()) -> str:
    """'5 + 20 blocks, width 3072', plus the listed further facts."""
    return f"{arch.double_blocks} + {arch.single_blocks} blocks, width {arch.width}{_extras(arch, facts)}"


def _choice(flavours: list[registry.Flavour], family: str) -> str:
    if not flavours:
        return "no flavour fits it; choose a folder or file of the flavour you want to train"
    names = [f.name for f in flavours if f.family == flavours[0].family]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    if flavours[0].family != family:
        return f"set model.family = {flavours[0].family} and model.flavour = {listed}"
    return f"choose model.flavour = {listed}"


def mismatch(field: str, where: str, found: Architecture, flavour: registry.Flavour) -> str | None:
    """One line when the transformer at `where` is not built as `flavour`'s, naming what it is and the flavour to
    choose instead; None when it fits."""
    wanted = of_flavour(flavour)
    different = differences(found, wanted)
    if not different:
        return None
    main = ("family", "double_blocks", "single_blocks", "width")
    # heads, joint dimension, guidance and input channels are named when they alone tell the two apart
    facts = () if any(fact in main for fact in different) else tuple(different)
    return (f"{field}: '{where}' is {describe(found, facts)}, not {flavour.label} (model.family = {flavour.family}, "
            f"model.flavour = {flavour.name}: {shape(wanted, facts)}); "
            f"{_choice(fitting(found), flavour.family)}")
