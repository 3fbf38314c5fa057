"""sample.clip_score_model: each validation's samples are scored against their prompts by a CLIP model, logged
beside the evaluation loss (and to trackers), and the model is freed after; here a tiny random CLIP."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer import clip_score
from trainer.events import ClipScore, Event
from trainer.preflight import check_files
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trainer.demo import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_scores_are_clipscores_and_the_model_is_freed(tiny_clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[weakref.ref] = []
    real_load = clip_score._load

    def tracked(source: str, device: torch.device):  # noqa: ANN202
        model, processor = real_load(source, device)
        loaded.append(weakref.ref(model))
        return model, processor

    monkeypatch.setattr(clip_score, "_load", tracked)
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    scores = clip_score.clip_scores(str(tiny_clip), [red, blue], ["a red square", "a blue square"],
                                    torch.device("cpu"))
    # CLIPScore by hand: 100 x cosine of CLIP's projected image and text features, floored at 0
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=[red, blue], return_tensors="pt")["pixel_values"]
        tokens = processor(text=["a red square", "a blue square"], return_tensors="pt", padding=True)
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image, text = (getattr(t, "pooler_output", t) for t in (image, text))
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    assert scores == pytest.approx((100 * cosine).clamp_min(0).tolist(), abs=1e-4)
    del model
    gc.collect()
    assert loaded and loaded[0]() is None  # nothing keeps the CLIP model alive


def test_a_run_logs_the_clip_score_of_each_validation(demo_dir: Path, tmp_path: Path, tiny_clip: Path) -> None:
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [
        "train.max_steps=2", "sample.every_steps=2", "sample.steps=1", "output.save_state=false",
        f"output.dir='{tmp_path}'", f"sample.clip_score_model='{tiny_clip}'", "output.log_with=[]"]), demo_dir)
    events: list[Event] = []
    session = Session(spec, emit=events.append)
    try:
        session.run()
    finally:
        session.end()
    scores = [e for e in events if isinstance(e, ClipScore)]
    assert [e.step for e in scores] == [0, 2]  # the baseline and step 2
    assert all(0.0 <= e.score <= 100.0 for e in scores)
    logged = (tmp_path / "events.jsonl").read_text()
    assert '"event": "clip_score"' in logged or '"clip_score"' in logged


def test_a_folder_without_a_clip_model_is_refused(demo_dir: Path, tmp_path: Path) -> None:
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [f"sample.clip_score_model='{tmp_path}'",
                                                           f"output.dir='{tmp_path / 'out'}'"]), demo_dir)
    assert any(p.startswith("sample.clip_score_model: ") and "no config.json" in p for p in check_files(spec))


def test_the_run_tab_plots_the_scores() -> None:
    from ui.run_state import RunView
    from ui.run_tab import clip_frame

    view = RunView()
    assert clip_frame(view) is None  # hidden until a score arrives
    view.apply([ClipScore(step=0, score=21.5), ClipScore(step=20, score=24.0)])
    frame = clip_frame(view)
    assert frame["step"].tolist() == [0, 20] and frame["clip_score"].tolist() == [21.5, 24.0]
    assert "CLIP score 24.0 (step 20)" in view.progress_line()
