"""Peak RAM of loading a quantised transformer with our streaming loader, against its final size.

    python bench/bench_quantize_load.py [--double 1] [--single 3] [--shard-gb 0]

Writes (in a temp dir) a FLUX.2 [klein]-4B-shaped Flux2Transformer2DModel (hidden 3072, 24 heads, joint dim
7680) with fewer blocks and random bf16 weights, then loads it in a fresh child process per precision: ours at
fp8, int8, int4 and nf4, and as the bare reference diffusers' `from_pretrained` in bf16. Each child reports
its peak RSS (VmHWM, Linux) minus its RSS after imports, once every page of the model has been read (diffusers
maps the file, and its bf16 tensors cost RAM only when used), the final size of the model's tensors, and the
ratio of the two: a loader that never holds more than the final model plus one slice scores near 1 (target
<= 1.3). Seconds include that read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISIONS = ("bf16", "fp8", "int8", "int4", "nf4")
KLEIN_4B = {"in_channels": 128, "num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 7680,
            "guidance_embeds": False}


def write_model(folder: Path, double: int, single: int, shard_gb: float) -> int:
    """config.json and random bf16 safetensors (sharded if asked); returns the file bytes."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    with init_empty_weights():
        model = Flux2Transformer2DModel(num_layers=double, num_single_layers=single, **KLEIN_4B)
    model.save_config(folder)
    generator = torch.Generator().manual_seed(0)
    # One shard in memory at a time; the parent's memory is not measured.
    limit = int(shard_gb * 2**30) if shard_gb else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, param in model.state_dict().items():
        tensor = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        if limit and shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > limit:
            shards.append({})
        shards[-1][name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "diffusion_pytorch_model.safetensors"))
        return size
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, 1):
        file = f"diffusion_pytorch_model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file))
        weight_map.update(dict.fromkeys(shard, file))
    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    return size


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _touch(tensors: list) -> None:  # noqa: ANN001 - torch tensors
    """Read one byte per page: diffusers' bf16 tensors map the file and cost RAM only once they are used."""
    import torch

    for tensor in tensors:
        torch.sum(tensor.detach().contiguous().view(-1).view(torch.uint8)[::2048])


def child(precision: str, folder: Path) -> None:
    import torch
    from diffusers import Flux2Transformer2DModel

    from trainer.memory.quantize import load_quantized_transformer
    from trainer.quiet import silence_library_noise

    silence_library_noise()
    # ru_maxrss survives exec (it would count the parent's RSS at fork); VmHWM belongs to this process's memory
    # map alone, and writing 5 to clear_refs resets it to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    if precision == "bf16":
        model = Flux2Transformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    else:
        model = load_quantized_transformer(folder, Flux2Transformer2DModel, precision, torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    _touch(tensors)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    final = sum(t.nbytes for t in tensors)
    print(json.dumps({"peak_over_baseline": peak - baseline, "final": final, "seconds": seconds}))


def measure(precision: str, folder: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--child", precision, "--folder", str(folder)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (klein-4B has 5)")
    parser.add_argument("--single", type=int, default=3, help="single-stream blocks (klein-4B has 20)")
    parser.add_argument("--shard-gb", type=float, default=0.0, help="write shards of this size (0: one file)")
    parser.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        file_bytes = write_model(folder, args.double, args.single, args.shard_gb)
        results = {precision: measure(precision, folder) for precision in PRECISIONS}
    mib = 2**20
    print(f"klein-4B-shaped transformer, {args.double} double + {args.single} single blocks, "
          f"{file_bytes / 2**30:.2f} GiB of bf16 safetensors")
    print(f"{'loader':26}{'final MiB':>11}{'peak - base MiB':>17}{'ratio':>8}{'seconds':>9}")
    for precision, r in results.items():
        name = "diffusers bf16 (bare)" if precision == "bf16" else f"streaming {precision}"
        print(f"{name:26}{r['final'] / mib:11.0f}{r['peak_over_baseline'] / mib:17.0f}"
              f"{r['peak_over_baseline'] / r['final']:8.3f}{r['seconds']:9.1f}")
    print("ratio = (peak RSS - RSS after imports) / final tensor bytes; target <= 1.3")


if __name__ == "__main__":
    main()
