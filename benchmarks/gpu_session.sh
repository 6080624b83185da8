#!/usr/bin/env bash
# The device session's one script (issue 8): CUDA tests, then the GPU targets with and without gradient
# dropout, then a bf16 profile; about 4 minutes on an H100/H200. Everything lands under $OUT (default ./gpu_out).
#
# The lent machine has torch with CUDA but no network: carry the two pinned wheels in .whl/ (git-ignored), made
# here with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl peft==0.21.2 transformers==5.23.0
# (match --python-version to the device's python3), then run it there as `bash benchmarks/gpu_session.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-deps --target /tmp/mist_site .whl/*.whl
  export PYTHONPATH=/tmp/mist_site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt" || true
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
  | tee -a "$OUT/device.txt"
python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/test_cuda.txt"
python3 benchmarks/gpu_check.py --output-dir "$OUT/bf16" --budget-s 180
python3 benchmarks/gpu_check.py --output-dir "$OUT/grad_drop0" --grad-drop 0 --configs text-bert-base vision-vit-b16 \
  --budget-s 60
python3 benchmarks/profile_ops.py --device cuda --dtype bf16 --hidden 768 --model text --output-dir "$OUT/profile"
