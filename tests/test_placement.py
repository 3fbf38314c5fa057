"""Text encoders streamed layer by layer give the embeddings of the encoder in place; the transformer's swapped
blocks keep their frozen weights off the device while the rest moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import registry
from trainer.families import family_ops
from trainer.memory.placement import TextEncoderPlacement, decoder_layers

PROMPTS = ["a red cube on a table", "a cat"]


@pytest.mark.parametrize("family", ["flux2", "flux1"])
def test_streamed_text_encoders_give_the_same_embeddings(demo_dir: Path, family: str) -> None:
    ops, flavour = family_ops(family), registry.get_flavour(family, "demo")
    pipe = ops.load_pipeline(str(demo_dir / family), flavour, torch.float32)
    expected = ops.encode_prompts(pipe, PROMPTS, flavour)
    placement = TextEncoderPlacement(pipe, torch.device("cpu"), "offload")
    assert placement.swappers  # the layers really stream (through plain copies on this CPU)
    streamed = ops.encode_prompts(pipe, PROMPTS, flavour)
    for name, value in expected.items():
        torch.testing.assert_close(streamed[name], value, rtol=0, atol=0, msg=name)
    assert sum(s.stats.copies for s in placement.swappers) >= len(decoder_layers(pipe.text_encoder))
    placement.release()
    again = ops.encode_prompts(pipe, PROMPTS, flavour)
    for name, value in expected.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["cpu", "offload"])
def test_an_encoder_computing_on_the_cpu_trims_the_heap_after_each_layer(
        demo_dir: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.memory.placement as placement_module

    ops, flavour = family_ops("flux2"), registry.get_flavour("flux2", "demo")
    pipe = ops.load_pipeline(str(demo_dir / "flux2"), flavour, torch.float32)
    expected = ops.encode_prompts(pipe, PROMPTS, flavour)
    trims: list[int] = []
    monkeypatch.setattr(placement_module, "release_freed_heap", lambda: trims.append(1) or True)
    placement = TextEncoderPlacement(pipe, torch.device("cpu"), mode)
    placed = ops.encode_prompts(pipe, PROMPTS, flavour)
    assert len(trims) == len(decoder_layers(pipe.text_encoder))  # one forward of the prompts: one trim per layer
    for name, value in expected.items():  # the hook leaves each layer's output as it was
        torch.testing.assert_close(placed[name], value, rtol=0, atol=0, msg=name)
    placement.release()
    ops.encode_prompts(pipe, PROMPTS, flavour)
    assert len(trims) == len(decoder_layers(pipe.text_encoder))  # released: no hook left


def test_decoder_layers_finds_the_outer_list(demo_dir: Path) -> None:
    ops, flavour = family_ops("flux1"), registry.get_flavour("flux1", "demo")
    pipe = ops.load_pipeline(str(demo_dir / "flux1"), flavour, torch.float32)
    assert decoder_layers(pipe.text_encoder_2) == list(pipe.text_encoder_2.encoder.block)


def test_a_run_stopped_while_caching_text_releases_its_placement(demo_dir: Path, tmp_path: Path) -> None:
    """Stop pressed while the captions are encoded: the session ends with the text encoder's streaming undone
    (on a GPU, the layers' host buffers unpinned), not left for the next run in this process to pin again."""
    from trainer.errors import UserError
    from trainer.events import PhaseChanged
    from trainer.runners.base import Commands
    from trainer.session import Session
    from trainer.spec import load_spec, resolve_paths

    spec = resolve_paths(load_spec(demo_dir / "job.toml", [
        "sample.prompts=[]", "output.save_state=false", f"output.dir='{tmp_path}'",
        "lowvram.text_encoder_device='offload'"]), demo_dir)
    commands, placed = Commands(), []

    def emit(event: object) -> None:
        if isinstance(event, PhaseChanged) and event.phase == "caching text embeddings":
            commands.request_stop()
            placed.append(session._text_placement)

    session = Session(spec, emit=emit, commands=commands)
    with pytest.raises(UserError, match="stopped while caching text embeddings"):
        session.run()
    assert placed[0] is not None and placed[0].swappers  # streamed while it cached
    session.end()
    assert session._text_placement is None
    assert not placed[0].swappers and not placed[0].hooks
