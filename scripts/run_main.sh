#!/usr/bin/env bash
# The main job: every notebook with the given profile (default: default) into outputs/<run_name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m forgetlab.batch "${1:-default}"
