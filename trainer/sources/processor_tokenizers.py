"""Tokenizers that a pipeline folder names as a multimodal processor, loaded as the text tokenizer inside it.

FLUX.2 [dev]'s repo names its tokenizer `["transformers", "PixtralProcessor"]` in model_index.json: Mistral's
tokenizer plus a Pixtral image processor. transformers builds that processor only with torchvision installed, which
must never be installed next to this torch. Flux2Pipeline uses it for text alone (`apply_chat_template` on the
system message and the prompt), and a tokenizer answers that call the same way, so the tokenizer and the chat
template are all that load. (Only `upsample_prompt`, which this trainer never calls, reads images through it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import UserError

# Where a processor folder keeps its chat template, newest layout first: transformers' tokenizer loader reads the
# first itself; processors saved before transformers 4.52 wrote the second ({"chat_template": "..."}); the third
# is older still.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json")


def processor_components(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Component -> class name, for the components of `folder`/model_index.json that name a transformers processor
    (loaded here as tokenizers), leaving out `skip`."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if library == "transformers" and isinstance(class_name, str) and class_name.endswith("Processor"):
            found[name] = class_name
    return found


def _chat_template(folder: Path) -> str | None:
    """The chat template a processor folder stores beside its tokenizer, in any of transformers' layouts."""
    for name in _TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if name.endswith(".jinja"):
            return text
        template = json.loads(text).get("chat_template")
        if template:
            return template
    return None


def load_text_tokenizer(folder: Path, class_name: str) -> Any:
    """The tokenizer of the processor saved in `folder`, with the processor's chat template."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"model.source: '{folder}' holds no tokenizer_config.json for the {class_name} that "
                        f"model_index.json names; download the repo's '{folder.name}' folder again")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _chat_template(folder)
    if tokenizer.chat_template is None:
        raise UserError(f"model.source: '{folder}' holds no chat template ({' or '.join(_TEMPLATE_FILES[:2])}); "
                        f"the pipeline renders every prompt through it. Download the repo's '{folder.name}' "
                        f"folder again")
    return tokenizer


def load_processor_tokenizers(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Component -> tokenizer, for every processor component of the pipeline folder not in `skip`."""
    return {name: load_text_tokenizer(folder / name, class_name)
            for name, class_name in processor_components(folder, skip).items()}
