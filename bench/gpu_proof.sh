#!/usr/bin/env bash
# The GPU proof in one command (≤ 8 minutes on one H100): FLUX.2 [klein] base 9B fabricated at real size, the 8 GB
# preset at 1024 px under an emulated 8 GB card, its speed against no savers and half the blocks swapped against
# none, the estimator against the measured peak VRAM for every strategy, and fp8/int8/int4/nf4 bases on CUDA.
# See bench/gpu_proof.py. `--dry-run` runs the same logic on the CPU at tiny widths (CI runs it).
#   bench/gpu_proof.sh [--dry-run] [--work DIR] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
python=".venv/bin/python"
[ -x "$python" ] || python="python3"
exec "$python" bench/gpu_proof.py "$@"
