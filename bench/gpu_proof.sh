#!/usr/bin/env bash
# The GPU proof in one command (≤ 8 minutes on one H100): FLUX.2 [klein] base 9B fabricated at real size, the 8 GB
# preset at 1024 px under an emulated 8 GB card, its speed against no savers and half the blocks swapped against
# none, the estimator against the measured peak VRAM for every strategy, and fp8/int8/int4/nf4 bases on CUDA.
# See bench/gpu_proof.py. `--dry-run` runs the same logic on the CPU at tiny widths (CI runs it).
#   bench/gpu_proof.sh [--dry-run] [--work DIR] [--json FILE]
# On a GPU machine whose Python lacks this project's packages and cannot download them, carry the wheels that
# bench/gpu_wheels.sh writes into .whl/: they are installed into a folder of their own and put first on the path.
set -euo pipefail
cd "$(dirname "$0")/.."
python=".venv/bin/python"
[ -x "$python" ] || python="python3"
export HF_HUB_OFFLINE=1  # nothing is downloaded: the model is fabricated where the proof runs
missing() {
  "$python" -c 'import importlib.util as u, sys; print(" ".join(n for n in sys.argv[1:] if u.find_spec(n) is None))' \
    torch diffusers transformers peft accelerate safetensors pydantic tomli_w PIL psutil
}
if [ -n "$(missing)" ] && compgen -G ".whl/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/gpu_proof_site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
lacking=$(missing)
if [ -n "$lacking" ]; then
  echo "error: $python lacks $lacking; run bench/gpu_wheels.sh where pip reaches the index and bring .whl/ along" >&2
  exit 2
fi
exec "$python" bench/gpu_proof.py "$@"
