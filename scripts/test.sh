#!/usr/bin/env bash
# Install everything the tests need (Python packages and Debian's Chromium for the
# browser test), lint, then run the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check core pages app.py tests bench
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
