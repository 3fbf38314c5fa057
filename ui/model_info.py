"""What the Model and Advanced tabs say about a flavour: its summary line and the LoRA target counts."""

from __future__ import annotations

from trainer import registry


def flavour_summary(family: str, flavour: str) -> str:
    """Markdown line describing a flavour, shown under the menus."""
    try:
        info = registry.get_flavour(family, flavour)
    except KeyError as exc:
        return str(exc)
    source = "built locally, random weights" if info.is_demo else f"hub `{info.hub_id}`"
    return (f"**{info.label}** — {source}; text encoder {info.text_encoder_label}; "
            f"samples with {info.sample_steps} steps, guidance {info.sample_guidance}, "
            f"{info.sample_resolution} px")


def target_counts(family: str, flavour: str, current: str = "") -> str:
    """Markdown: how many modules each LoRA target preset hits on the flavour's transformer.

    Builds the transformer on the meta device (no weights), so it imports torch and diffusers: call it from a
    handler, never at import. The first call takes a few seconds.
    """
    from trainer.adapters import flavour_preset_counts

    try:
        info = registry.get_flavour(family, flavour)
        counts = flavour_preset_counts(family, flavour)
    except (KeyError, ValueError) as exc:
        return f"**Cannot count the target modules:** {exc.args[0] if exc.args else exc}"
    lines = [f"Modules each preset targets on **{info.label}** ({info.double_blocks} double + "
             f"{info.single_blocks} single blocks):", "", "| preset | modules |", "| --- | ---: |"]
    for preset, count in counts.items():
        name = f"**{preset}** (selected)" if preset == (current or "").strip() else preset
        lines.append(f"| {name} | {count} |")
    if current and current.strip() not in counts:
        lines += ["", f"`{current.strip()}` is a custom regex: it must match whole module names."]
    return "\n".join(lines)
