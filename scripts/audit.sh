#!/usr/bin/env bash
# Check the dependencies for known vulnerabilities with pip-audit (advisories from PyPI).
#
#   bash scripts/audit.sh            audit the versions requirements.txt resolves to today
#                                    (pip-audit resolves them in a throw-away environment)
#   bash scripts/audit.sh --installed  audit what .venv has installed (quick, no resolving;
#                                    also lists packages installed by hand)
#
# Exit code 0: every package was checked and none has a known vulnerability; 1: vulnerabilities
# found (listed with their fix versions) or a package could not be checked (--strict: an audit
# that could not look a package up must not pass silently).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/pip-audit ]; then
  bash scripts/setup_env.sh requirements-dev.txt
fi
if [ "${1:-}" = "--installed" ]; then
  exec .venv/bin/pip-audit --strict --progress-spinner off --desc on --skip-editable
fi
exec .venv/bin/pip-audit --strict --progress-spinner off --desc on --requirement requirements.txt
