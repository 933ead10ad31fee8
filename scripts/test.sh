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
.venv/bin/ruff format --check core pages app.py tests bench
.venv/bin/mypy core
# Dependency audit of the installed environment: any known vulnerability fails the run. Where
# the advisory service cannot be reached, pip-audit can only say so; that is reported, not fatal.
audit_log="$(mktemp)"
timeout 300 .venv/bin/pip-audit --progress-spinner off >"$audit_log" 2>&1 || true
if grep -Eq "Found [0-9]+ known vulnerabilit" "$audit_log"; then
  cat "$audit_log"
  exit 1
fi
grep -Eq "No known vulnerabilities found" "$audit_log" || echo "pip-audit: advisory service unreachable; dependencies not audited in this run"
rm -f "$audit_log"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
