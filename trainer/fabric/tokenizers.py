"""Small tokenizers for fabricated and tiny pipelines: byte-level vocabularies whose ids stay far below the real
models' (a few hundred ids against Qwen3's 151936), with each model's special tokens and chat template.
"""

from __future__ import annotations

from typing import Any

from trainer.demo import _byte_level_alphabet, _clip_tokenizer, _t5_tokenizer

__all__ = ["MISTRAL_CHAT_TEMPLATE", "QWEN3_CHAT_TEMPLATE", "clip_tokenizer", "mistral_tokenizer", "qwen3_tokenizer",
           "t5_tokenizer"]

clip_tokenizer = _clip_tokenizer
t5_tokenizer = _t5_tokenizer


# Mistral-Small-3.1's chat format, reduced to what FLUX.2 sends (a system and a user message, text blocks only).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)
# Qwen3's chat format for one turn, with its enable_thinking switch (klein renders with enable_thinking=False).
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def mistral_tokenizer() -> Any:
    """A byte-level tokenizer with Mistral's special tokens and chat template.

    The hub repo's tokenizer is a PixtralProcessor, which transformers refuses to build without torchvision (not
    installable next to this torch). Flux2Pipeline only calls `tokenizer.apply_chat_template(...)` on it, which a
    tokenizer answers the same way: render the template, then tokenise without adding special tokens again."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    vocab = {token: i for i, token in enumerate(special)}
    for char in _byte_level_alphabet():
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=special[4:], model_max_length=2048,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def qwen3_tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {char: i for i, char in enumerate(_byte_level_alphabet())}
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer
