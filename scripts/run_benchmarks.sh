#!/usr/bin/env bash
# All benchmarks (exposure, scoring, evaluation: a recorded step and trajectories on the pool, training, llm:
# notebook 06's phases, batch timings) in one run; options go to benchmarks/run_all.py, e.g. --run-smoke (run the
# smoke batch first), --quick (smoke-size llm section, fewer repeats), --only evaluation, --compile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/run_all.py "$@"
