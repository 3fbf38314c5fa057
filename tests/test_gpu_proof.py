"""bench/gpu_proof.sh's logic on the CPU at tiny widths (--dry-run): every case builds its job from the klein base
9B 8 GB preset, trains with the user's Session, is measured and estimated, and the targets are computed. The
proof itself needs a CUDA GPU (set_per_process_memory_fraction, max_memory_allocated)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, python_env


@pytest.mark.slow  # ten tiny Session runs (klein 9B's 32 blocks at width 128)
def test_gpu_proof_dry_run_runs_every_case(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_proof
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from trainer import registry

    real = registry.get_flavour("flux2", "klein-base-9b")
    assert gpu_proof.main(["--dry-run", "--work", str(tmp_path), "--json", str(tmp_path / "proof.json")]) == 0
    assert registry.get_flavour("flux2", "klein-base-9b") is real  # the tiny stand-in is gone again
    results = json.loads((tmp_path / "proof.json").read_text(encoding="utf-8"))
    assert set(results) == {case.name for case in gpu_proof.cases()}
    for name, result in results.items():
        assert "error" not in result, (name, result)
        assert result["s_per_step"] > 0 and result["predicted_gib"] > 0, name
    plans = {name: result["plan"] for name, result in results.items()}
    # each case runs the strategy it names, not the preset's own [lowvram] choices (25 blocks, offloads, fused)
    assert plans["8gb-capped"] == {"strategy": "aggressive", "blocks_to_swap": 25, "cpu_offload_checkpointing": True,
                                   "fused_backward": True, "optimizer_offload": False}
    assert plans["half-swapped"]["blocks_to_swap"] == 16 and plans["none-swapped"]["blocks_to_swap"] == 0
    for name in ("half-swapped", "none-swapped", "base-fp8", "base-int8", "base-int4", "base-nf4"):
        assert plans[name]["strategy"] == "conservative", name
        assert not plans[name]["cpu_offload_checkpointing"] and not plans[name]["fused_backward"], name
    assert plans["aggressive"]["fused_backward"] and plans["aggressive"]["blocks_to_swap"] == 16
    assert plans["extreme"]["blocks_to_swap"] == 30 and plans["extreme"]["optimizer_offload"]


def test_gpu_proof_without_a_gpu_says_so() -> None:
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_proof.sh")], capture_output=True, text=True,
                          env={**python_env(), "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert "no CUDA GPU here" in done.stderr
