"""Peak RAM while a text encoder streams in quantised, against its final size: the loading peak must be the final
size plus about one slice, never the bf16 model.

Each precision loads in a fresh process (trainer.sources.assemble's path for a diffusers folder's text_encoder/:
`fill_text_encoder` over its safetensors shards); printed: the process's RSS after imports, its peak RSS
(ru_maxrss) after the load, the model's tensor bytes, and peak - baseline - size (what the load held beyond the
result). Point it at a real-size folder, e.g. a fabricated one (/work/fab/NAME, see /work/fab/README.txt):

    flock /tmp/bigrun.lock nice .venv/bin/python bench/bench_text_encoder_load.py /work/fab/klein-base-4b-hub \\
        --precisions nf4 fp8 bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from pathlib import Path
from trainer import registry
from trainer.sources.assemble import _text_encoder
from trainer.sources import ModelFiles
def rss_gib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024**2
base = rss_gib()
flavour = registry.get_flavour({family!r}, {flavour!r})
start = time.perf_counter()
model = _text_encoder(Path({folder!r}), flavour, {index}, torch.bfloat16, {precision!r}, ModelFiles(), {{}})
seconds = time.perf_counter() - start
tensors = {{id(t): t for t in [*model.parameters(), *model.buffers()]}}
size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1024**3
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
print(json.dumps({{"baseline": base, "peak": peak, "size": size, "seconds": seconds}}))
"""


def _flavour(folder: Path) -> tuple[str, str]:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    from trainer import registry

    for family in registry.FAMILIES.values():
        for flavour in family.flavours.values():
            if flavour.pipeline_class == index["_class_name"] and not flavour.is_demo:
                config = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
                width = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
                if flavour.family == "flux1" or flavour.joint_attention_dim == 3 * width:
                    return family.name, flavour.name
    raise SystemExit(f"{folder}: no flavour matches its model_index.json and text encoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a diffusers pipeline folder with real-size text encoders")
    parser.add_argument("--precisions", nargs="+", default=["nf4", "fp8", "bf16"])
    parser.add_argument("--encoder", type=int, default=-1, help="0 text_encoder, 1 text_encoder_2 (default: last)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    family, flavour = _flavour(args.folder)
    index = args.encoder if args.encoder >= 0 else (1 if family == "flux1" else 0)
    print(f"{args.folder} ({family} {flavour}), text encoder {index}")
    print(f"{'precision':>10}{'baseline':>10}{'peak':>8}{'size':>8}{'held beyond':>13}{'load s':>8}  (GiB)")
    for precision in args.precisions:
        code = CHILD.format(root=str(ROOT), family=family, flavour=flavour, folder=str(args.folder), index=index,
                            precision=precision)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        extra = r["peak"] - r["baseline"] - r["size"]
        print(f"{precision:>10}{r['baseline']:10.2f}{r['peak']:8.2f}{r['size']:8.2f}{extra:13.2f}{r['seconds']:8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
