"""Sliders for the form: a value beyond a slider's bounds is clamped to them, never refused. Gradio's own Slider
answers one with an error toast that names no field ("Value 2 is greater than maximum value 0.99.") when a user
types it into the slider's number box (the box then shows the bound) or when a stale value arrives after its
bounds changed."""

from __future__ import annotations

import gradio as gr


def _bound_slider_class() -> type[gr.Slider]:
    """A slider that clamps a value beyond its bounds, never an error naming no field. Its bound may follow the
    flavour (Blocks to swap): when a loaded job changes the flavour, the change events of the other controls send
    the slider's old value (25 blocks of klein 9B) before its own update lands, and gradio's Slider answered each
    with "Value 25 is greater than maximum value 2." (an error toast and a traceback per handler). A subclass,
    because gradio rebuilds a session's updated component from its class."""
    from gradio import component_meta

    def clamped(self: gr.Slider, payload: float) -> float:
        value = self.minimum if payload is None else min(max(payload, self.minimum), self.maximum)
        return gr.Slider.preprocess(self, value)

    # gradio writes a .pyi stub beside the module of every component class it sees defined; not in this project
    stub_writer = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        # is_template: the browser draws it as a plain slider
        return type(gr.Slider)("BoundSlider", (gr.Slider,), {"is_template": True, "preprocess": clamped,
                                                             "__module__": __name__})
    finally:
        component_meta.create_or_modify_pyi = stub_writer


BoundSlider = _bound_slider_class()
