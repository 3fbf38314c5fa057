"""Cached text embeddings of quantised text encoders against bf16's, on real-width encoders (random weights).

Each encoder has its real widths (hidden size, MLP width, heads) and a few layers, so the quantised Linears are
the real ones' shapes: Qwen3-8B (klein 9B), Qwen3-4B (klein 4B), Mistral-Small-3.1's text model (FLUX.2 dev),
T5-XXL and CLIP-L (FLUX.1, CLIP with all its 12 layers). The vocabulary is cut to 32k (token tables stay in bf16
in every format, so their size changes nothing compared here). Weights are written to a safetensors folder, then
loaded the way the trainer loads them (trainer.sources.single_file.fill_text_encoder: streamed, every Linear
quantised a slice of rows at a time) in bf16 and in each format; the same random prompt tokens go through each.

Printed per encoder and format: the encoder's size, the cosine similarity of the embeddings with bf16's (all
values flattened), the mean per-token cosine, and the max relative error (the largest ||e_q - e_bf16|| /
||e_bf16|| over tokens). The embeddings compared are what the pipelines cache: every decoder layer's output for
Qwen3 and Mistral (FLUX.2 stacks three of them), T5's last hidden state, CLIP's pooled output.

    flock /tmp/bigrun.lock nice .venv/bin/python bench/bench_text_encoder_quant.py [--layers 2] [--tokens 128]

Needs about 6 GB of RAM (Mistral's 32768-wide MLP).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.memory.quantize import FORMATS  # noqa: E402
from trainer.sources.reader import FileReader  # noqa: E402
from trainer.sources.recognise import Recognised  # noqa: E402
from trainer.sources.single_file import fill_text_encoder  # noqa: E402

VOCAB = 32000


def _configs(layers: int) -> dict[str, tuple[str, str, object]]:
    import transformers as t

    return {
        "Qwen3-8B": ("Qwen3ForCausalLM", "qwen3", t.Qwen3Config(
            hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=VOCAB, tie_word_embeddings=False)),
        "Qwen3-4B": ("Qwen3ForCausalLM", "qwen3", t.Qwen3Config(
            hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=VOCAB, tie_word_embeddings=True)),
        "Mistral-Small-3.1 (text)": ("MistralForCausalLM", "mistral", t.MistralConfig(
            hidden_size=5120, intermediate_size=32768, num_hidden_layers=layers, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=VOCAB, tie_word_embeddings=False)),
        "T5-XXL": ("T5EncoderModel", "t5", t.T5Config(
            d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=layers, feed_forward_proj="gated-gelu",
            vocab_size=32128)),
        "CLIP-L": ("CLIPTextModel", "clip", t.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, vocab_size=49408)),
    }


def _write(folder: Path, class_name: str, config: object) -> None:
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: half the RAM of an fp32 init
    try:
        model = getattr(transformers, class_name)(config)
    finally:
        torch.set_default_dtype(previous)
    state, seen = {}, set()
    for name, value in model.state_dict().items():  # a tied tensor once (T5's shared table, a tied lm_head)
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            state[name] = value.contiguous()
    save_file(state, str(folder / "model.safetensors"))
    config.save_pretrained(str(folder))
    del model, state
    gc.collect()


def _embed(model: torch.nn.Module, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if kind == "clip":
            return model(input_ids=tokens[:, :77]).pooler_output.float()
        if kind == "t5":
            return model(input_ids=tokens).last_hidden_state.float()
        out = model(input_ids=tokens, output_hidden_states=True)
        return torch.stack(out.hidden_states[1:]).float()  # every layer's output, as FLUX.2 picks from them


def _compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    flat = torch.nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0).item()
    rows_got, rows_ref = got.reshape(-1, got.shape[-1]).double(), ref.reshape(-1, ref.shape[-1]).double()
    per_token = torch.nn.functional.cosine_similarity(rows_got, rows_ref, dim=1).mean().item()
    relative = ((rows_got - rows_ref).norm(dim=1) / rows_ref.norm(dim=1).clamp_min(1e-12)).max().item()
    return flat, per_token, relative


def _size(model: torch.nn.Module) -> float:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1024**3


def run(layers: int, token_count: int, only: list[str] | None = None) -> None:
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, token_count))
    print(f"{'encoder':26}{'format':>7}{'GiB':>8}{'load s':>8}{'cosine':>11}{'token cos':>11}{'max rel err':>13}")
    for label, (class_name, kind, config) in _configs(layers).items():
        if only and not any(word in label for word in only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _write(folder, class_name, config)
            found = Recognised(kind, label, layout="hf")
            reference = None
            for fmt in ("bf16", *FORMATS):
                start = time.perf_counter()
                reader = FileReader(folder / "model.safetensors", "", "model.text_encoder")
                model = fill_text_encoder([reader], found, folder, class_name, torch.bfloat16, (), fmt)
                loaded = time.perf_counter() - start
                embedding = _embed(model, kind, tokens)
                size = _size(model)
                del model
                gc.collect()
                if reference is None:
                    reference = embedding
                    print(f"{label:26}{fmt:>7}{size:8.2f}{loaded:8.1f}{1.0:11.6f}{1.0:11.6f}{0.0:13.4f}", flush=True)
                    continue
                flat, per_token, relative = _compare(embedding, reference)
                print(f"{label:26}{fmt:>7}{size:8.2f}{loaded:8.1f}{flat:11.6f}{per_token:11.6f}{relative:13.4f}",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers / T5 blocks (CLIP keeps its 12)")
    parser.add_argument("--tokens", type=int, default=128, help="prompt tokens (CLIP reads the first 77)")
    parser.add_argument("--only", nargs="*", help="encoders whose name contains one of these words")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run(args.layers, args.tokens, args.only)


if __name__ == "__main__":
    main()
