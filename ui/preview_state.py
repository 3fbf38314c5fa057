"""Which live sampling preview the Run tab shows (sample.preview_every; trainer/previews.py), from the run's events.
Pure python: ui/run_state.py keeps the latest preview with `next_preview`, ui/previews.py shows it."""

from __future__ import annotations

from trainer.events import Event, PhaseChanged, Progress, RunFinished, SamplePreview, SampleSaved


def next_preview(current: SamplePreview | None, event: Event) -> SamplePreview | None:
    """The preview to show after `event`: a new preview replaces the one shown; the sample's final image, a
    training step, another phase or the run's end takes it away (its file is gone or going)."""
    if isinstance(event, SamplePreview):
        return event
    if isinstance(event, (SampleSaved, Progress, RunFinished)):
        return None
    if isinstance(event, PhaseChanged) and event.phase != "sampling":
        return None
    return current


def preview_label(preview: SamplePreview) -> str:
    """'sample 1/2 at step 20, denoising step 10/28: <prompt>'."""
    return (f"sample {preview.index}/{preview.count} at step {preview.step}, denoising step "
            f"{preview.denoise_step}/{preview.denoise_steps}: {preview.prompt}")
