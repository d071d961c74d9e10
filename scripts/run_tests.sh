#!/usr/bin/env bash
# The test job: unit tests, the smoke batch of every notebook, nbval over its outputs, the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONHASHSEED=0
py=.venv/bin/python

echo "== unit tests"
$py -m pytest tests -q -m "not browser" -p no:cacheprovider --durations=15

echo "== smoke batch (every notebook, papermill)"
rm -rf outputs/smoke
$py -m forgetlab.batch smoke --output-dir outputs/smoke

echo "== nbval: re-execute the smoke notebooks from an empty cache and compare outputs"
nbval_cache=$(mktemp -d)
rm -rf outputs/smoke/07_dose_sweep   # notebook 07 resumes its dose grid from here: make nbval recompute it
trap 'rm -rf "$nbval_cache"' EXIT
FORGETLAB_CACHE="$nbval_cache" $py -m pytest --nbval outputs/smoke/notebooks -q -p no:cacheprovider \
  --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 900

echo "== browser tests: notebooks 03, 06 and the lab in JupyterLab, driven in headless Chromium (screenshots: outputs/browser/)"
if [ ! -x /usr/bin/chromium ]; then
  echo "[browser] /usr/bin/chromium is missing: installing Debian's chromium package"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
FORGETLAB_REQUIRE_BROWSER=1 $py -m pytest tests -q -m browser -p no:cacheprovider
