#!/usr/bin/env bash
# The wheels bench/gpu_proof.sh installs on a GPU machine that cannot download: the packages its Python lacks
# (pydantic, tomli-w, diffusers) or holds at other versions than this project pins (transformers, peft,
# tokenizers), for CPython 3.12 on x86-64 Linux, into .whl/ (ignored by git). torch, accelerate, safetensors, numpy,
# pillow, psutil and huggingface_hub are the machine's own (its 1.33 is within what transformers asks; 2.x would
# need httpx2, which it lacks). Run it here, where pip reaches the package index:
#   bench/gpu_wheels.sh            then carry .whl with the command that runs bench/gpu_proof.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=".venv/bin/python"
[ -x "$python" ] || python="python3"
pinned() {  # NAME -> NAME==VERSION as installed here (the versions requirements.txt pins, and their own needs')
  "$python" -m pip show "$1" 2>/dev/null | awk -v name="$1" '/^Version:/ {print name "==" $2}'
}
wanted=()
for name in diffusers transformers peft tokenizers pydantic pydantic_core annotated-types \
            typing-inspection typing_extensions tomli_w importlib_metadata; do
  spec=$(pinned "$name")
  [ -n "$spec" ] || { echo "error: $name is not installed here; run ./launch.sh --test first" >&2; exit 2; }
  wanted+=("$spec")
done
rm -rf .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wanted[@]}"
du -sh .whl
ls .whl
