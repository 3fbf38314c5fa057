"""Low VRAM tab: the memory savers that work today (gradient checkpointing); more arrive with the trainer."""

from __future__ import annotations

from typing import Any

import gradio as gr


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any]) -> None:
    fields["lowvram.gradient_checkpointing"] = gr.Checkbox(
        value=defaults["lowvram.gradient_checkpointing"], label="Gradient checkpointing",
        info="recompute activations in the backward pass: much less memory for about 30% more time per step")
