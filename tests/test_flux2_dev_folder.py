"""FLUX.2 [dev] from a folder laid out as its hub repo: the PixtralProcessor tokenizer loads without torchvision.

black-forest-labs/FLUX.2-dev names `["transformers", "PixtralProcessor"]` as its tokenizer; transformers builds that
processor only with torchvision, which is never installed next to this torch. The loader takes the tokenizer and
the chat template out of the processor folder, and prompts encode exactly as the pipeline encodes them. The folder's
configs name the gated repo, and nothing asks the Hub for anything.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.fake_hub import FakeHub, serving
from tests.flavour_models import pipeline_for, save_flux2_dev_folder, tiny_flavour
from trainer.errors import UserError
from trainer.families import family_ops
from trainer.sources.processor_tokenizers import load_processor_tokenizers

FLAVOUR = tiny_flavour("flux2", "dev")  # FLUX.2 [dev] with the tiny model's sizes
PROMPTS = ["a red circle", "a green square on a blue background"]


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_flux2_dev_folder(tmp_path_factory.mktemp("flux2-dev"))


def _variant(dev_folder: Path, tmp_path: Path, template_file: str) -> Path:
    """The folder's index and tokenizer, with the chat template in an older layout of transformers' processors:
    chat_template.json, or inside processor_config.json; "" for none."""
    folder = tmp_path / "flux2-dev"
    tokenizer = Path(shutil.copytree(dev_folder / "tokenizer", folder / "tokenizer"))
    shutil.copy(dev_folder / "model_index.json", folder)
    template = (tokenizer / "chat_template.jinja").read_text(encoding="utf-8")
    (tokenizer / "chat_template.jinja").unlink()
    if template_file == "chat_template.json":
        (tokenizer / template_file).write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    elif template_file == "processor_config.json":
        config = json.loads((tokenizer / template_file).read_text(encoding="utf-8"))
        (tokenizer / template_file).write_text(json.dumps({**config, "chat_template": template}), encoding="utf-8")
    return folder


@pytest.fixture
def gated_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """huggingface_hub online with no token, its Hub refusing the gated repo; every request recorded."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with serving(FakeHub(FLAVOUR.hub_id, tmp_path, refuse="gated"), tmp_path / "cache") as hub:
        yield hub


def test_torchvision_is_absent_so_the_processor_itself_cannot_load(dev_folder: Path) -> None:
    import transformers

    assert importlib.util.find_spec("torchvision") is None  # never installed next to this torch (DESIGN.md)
    with pytest.raises(ImportError, match="Torchvision"):
        transformers.PixtralProcessor.from_pretrained(dev_folder / "tokenizer")


def test_the_repo_layout_loads_and_encodes_as_the_pipeline_does(dev_folder: Path, gated_hub: FakeHub) -> None:
    with pytest.raises(UserError, match="is a gated model and no Hugging Face token is set"):
        family_ops("flux2").load_pipeline(FLAVOUR.hub_id, FLAVOUR, torch.float32)  # the Hub is there, and refuses
    gated_hub.requests.clear()
    pipe = family_ops("flux2").load_pipeline(str(dev_folder), FLAVOUR, torch.float32)
    assert gated_hub.requests == []  # the configs name the gated repo; everything came from the folder
    assert type(pipe).__name__ == "Flux2Pipeline"
    assert type(pipe.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    assert "[SYSTEM_PROMPT]" in pipe.tokenizer.chat_template
    ours = family_ops("flux2").encode_prompts(pipe, PROMPTS, FLAVOUR)["prompt_embeds"]
    with torch.no_grad():  # the in-memory pipeline the folder was saved from, with its own tokenizer
        expected, _ = pipeline_for("flux2", "dev").encode_prompt(prompt=PROMPTS)
    assert ours.shape == (2, 512, 3 * 16)  # layers 10, 20 and 30 of the 40, stacked
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


@pytest.mark.parametrize("template_file", ["chat_template.json", "processor_config.json"])
def test_older_processor_layouts_keep_their_chat_template(dev_folder: Path, tmp_path: Path,
                                                          template_file: str) -> None:
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    folder = _variant(dev_folder, tmp_path, template_file)
    tokenizer = load_processor_tokenizers(folder)["tokenizer"]
    expected = pipeline_for("flux2", "dev").tokenizer
    assert tokenizer.chat_template == expected.chat_template
    # the pipeline's own call: system message and prompt, padded to 512 tokens
    call = {"add_generation_prompt": False, "tokenize": True, "return_dict": True, "return_tensors": "pt",
            "padding": "max_length", "truncation": True, "max_length": 512}
    ours = tokenizer.apply_chat_template(format_input(PROMPTS), **call)
    theirs = expected.apply_chat_template(format_input(PROMPTS), **call)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_a_processor_folder_without_chat_template_is_refused_by_name(dev_folder: Path, tmp_path: Path) -> None:
    folder = _variant(dev_folder, tmp_path, "")
    with pytest.raises(UserError, match=r"model.source: '.*tokenizer' holds no chat template \(chat_template.jinja "
                                        r"or chat_template.json\).*Download the repo's 'tokenizer' folder again"):
        family_ops("flux2").load_pipeline(str(folder), FLAVOUR, torch.float32)
    (folder / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match=r"model.source: '.*tokenizer' holds no tokenizer_config.json for the "
                                        r"PixtralProcessor that model_index.json names"):
        load_processor_tokenizers(folder)
