"""FLUX.1's AdaLN modulation quantised against kept in bf16, on a real-width FLUX.1 (random weights, shallow).

A FluxTransformer2DModel with FLUX.1 [dev]'s widths (hidden 3072, 24 heads of 128, MLP 4x, guidance embedding,
joint dim 4096, pooled 768) and `--double` double + `--single` single blocks is built in bf16, then quantised in
memory the way the trainer stores a quantised base (trainer.memory.quantize.quantize_model): for each base format,
once with the modulation Linears (norm1.linear, norm1_context.linear, norm.linear) left in bf16 and once quantised
in each format `model.modulation_precision` offers for it. The same noisy latents, text embeddings, timestep and
guidance go through each; printed: the modulation's share of the block weights, the stored size, and the output's
cosine similarity and relative error (||out - ref|| / ||ref||) against the bf16 model and against the same base
with bf16 modulation (what quantising the modulation adds).

    flock /tmp/bigrun.lock nice .venv/bin/python bench/bench_quantized_modulation.py [--double 1 --single 2]

`--modulation-only` keeps every other Linear in bf16 and quantises only the modulation, in each format: the
difference it alone makes (about a minute and 2 GB for one double block).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.memory.quantize import quantize_model  # noqa: E402

# what model.modulation_precision offers per base format (auto first)
CHOICES = {"fp8": ("fp8",), "int8": ("int8",), "int4": ("int8", "int4"), "nf4": ("int8", "nf4")}


def _model(double: int, single: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def _inputs(image_tokens: int, text_tokens: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    side = int(image_tokens ** 0.5)
    grid = (torch.zeros(1), torch.arange(side).float(), torch.arange(side).float())
    ids = torch.stack(torch.meshgrid(*grid, indexing="ij"), -1)
    return {
        "hidden_states": torch.randn(1, image_tokens, 64, generator=generator).bfloat16(),
        "encoder_hidden_states": torch.randn(1, text_tokens, 4096, generator=generator).bfloat16(),
        "pooled_projections": torch.randn(1, 768, generator=generator).bfloat16(),
        "timestep": torch.tensor([0.6]).bfloat16(),
        "guidance": torch.tensor([3.5]).bfloat16(),
        "img_ids": ids.reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text_tokens, 3),
    }


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


def _compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0).item()
    return cosine, ((got - ref).norm() / ref.norm()).item()


def _size(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--image-tokens", type=int, default=256, help="a square number (256: 256 px)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--modulation-only", action="store_true", help="the rest of the model stays in bf16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = _model(args.double, args.single)
    inputs = _inputs(args.image_tokens, args.text_tokens)
    reference = _run(base, inputs)
    blocks = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n]
    modulation = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".norm" in n
                  and "transformer_blocks" in n]
    share = sum(m.weight.numel() for m in modulation) / sum(m.weight.numel() for m in blocks)
    print(f"FLUX.1 widths, {args.double} double + {args.single} single blocks, {args.image_tokens} image + "
          f"{args.text_tokens} text tokens; modulation is {share:.1%} of the block Linears; bf16 {_size(base):.2f} GiB")
    if args.modulation_only:
        _modulation_only(base, inputs, reference)
        return
    print(f"{'base':>5}{'modulation':>12}{'GiB':>7}{'cos vs bf16':>13}{'rel err vs bf16':>17}"
          f"{'cos vs bf16 mod':>17}{'rel err vs bf16 mod':>21}")
    for fmt, choices in CHOICES.items():
        model = quantize_model(copy.deepcopy(base), fmt, torch.bfloat16)
        size, kept = _size(model), _run(model, inputs)
        del model
        cosine, error = _compare(kept, reference)
        print(f"{fmt:>5}{'bf16':>12}{size:7.2f}{cosine:13.6f}{error:17.5f}{1.0:17.6f}{0.0:21.5f}", flush=True)
        for stored in choices:
            model = quantize_model(copy.deepcopy(base), fmt, torch.bfloat16, modulation=stored)
            size = _size(model)
            out = _run(model, inputs)
            del model
            gc.collect()
            cosine, error = _compare(out, reference)
            cos_kept, err_kept = _compare(out, kept)
            print(f"{fmt:>5}{stored:>12}{size:7.2f}{cosine:13.6f}{error:17.5f}{cos_kept:17.6f}{err_kept:21.5f}",
                  flush=True)


def _modulation_only(base: torch.nn.Module, inputs: dict[str, torch.Tensor], reference: torch.Tensor) -> None:
    from trainer.memory.quantize import QuantizedLinear, linear_formats

    print(f"{'modulation':>12}{'GiB':>7}{'cos vs bf16':>13}{'rel err vs bf16':>17}")
    for fmt in ("fp8", "int8", "int4", "nf4"):
        model = copy.deepcopy(base)
        for name in linear_formats(model, "bf16", fmt):  # the modulation Linears alone
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    QuantizedLinear.from_linear(model.get_submodule(name), fmt, torch.bfloat16))
        size, out = _size(model), _run(model, inputs)
        del model
        gc.collect()
        cosine, error = _compare(out, reference)
        print(f"{fmt:>12}{size:7.2f}{cosine:13.6f}{error:17.5f}", flush=True)


if __name__ == "__main__":
    main()
