#!/usr/bin/env bash
# All benchmarks (exposure, scoring, training, batch timings) in one run; options go to benchmarks/run_all.py,
# e.g. --run-smoke (run the smoke batch first), --quick, --only training, --compile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/run_all.py "$@"
