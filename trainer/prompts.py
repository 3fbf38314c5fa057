"""Sample prompts: `<token>` becomes the trigger word, `@name` is looked up in the prompt library (no torch)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.regular_files import NotRegularFile, read_regular
from trainer.spec import JobSpec

TOKEN = "<token>"


@dataclass(frozen=True)
class SamplePrompt:
    name: str  # used in the sample's file name
    text: str


MAX_LIBRARY_BYTES = 16 * 2**20  # far above any prompt library (a few kB); a bigger file is not one


def trigger_word(spec: JobSpec) -> str:
    """The first dataset's trigger word: what `<token>` stands for."""
    return next((entry.trigger for entry in spec.data.datasets if entry.trigger), "")


def load_prompt_library(path: Path) -> dict[str, str]:
    try:
        text = read_regular(path, MAX_LIBRARY_BYTES)
        if text is None:
            raise UserError(f"sample.prompt_library: '{path}' is larger than {MAX_LIBRARY_BYTES // 2**20} MB; a "
                            "prompt library is a few kB of name = \"prompt\" lines")
        data = tomllib.loads(text.decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"sample.prompt_library: file '{path}' does not exist") from None
    except NotRegularFile as exc:
        raise UserError(f"sample.prompt_library: '{path}' {exc}; give a TOML file of name = \"prompt\" lines") \
            from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"sample.prompt_library: cannot read '{path}' as TOML ({exc})") from None
    bad = [name for name, text in data.items() if not isinstance(text, str)]
    if bad:
        raise UserError(f"sample.prompt_library: '{path}' must hold lines of name = \"prompt\"; "
                        f"not a prompt: {', '.join(bad)}")
    return data


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "prompt"


def sample_prompts(spec: JobSpec) -> list[SamplePrompt]:
    """The prompts to render, in order; raises UserError naming an unknown `@name` or a `<token>` without trigger."""
    library = load_prompt_library(Path(spec.sample.prompt_library)) if spec.sample.prompt_library else {}
    trigger = trigger_word(spec)
    prompts: list[SamplePrompt] = []
    for index, raw in enumerate(spec.sample.prompts):
        name, text = str(index), raw
        if raw.startswith("@"):
            name = raw[1:]
            if name not in library:
                known = ", ".join(library) or "none: set sample.prompt_library"
                raise UserError(f"sample.prompts[{index}]: '{raw}' is not in the prompt library (known: {known})")
            text = library[name]
        if TOKEN in text and not trigger:
            raise UserError(f"sample.prompts[{index}]: uses {TOKEN} but no dataset has a trigger word; "
                            "set data.datasets[0].trigger")
        prompts.append(SamplePrompt(_file_safe(name), text.replace(TOKEN, trigger)))
    return prompts
