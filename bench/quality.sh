#!/usr/bin/env bash
# One command for the committed quality table: installs the evaluation's data and peers into
# ./.venv (the test environment: tests/install.sh; nothing is fetched at run time), then runs
# bench/quality.py.
#   bash bench/quality.sh            # -> bench/results/quality.{md,json,png}  (~15 min on 2 cores)
#   bash bench/quality.sh --quick    # any bench/quality.py arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install.sh
.venv/bin/python bench/quality.py "$@"
