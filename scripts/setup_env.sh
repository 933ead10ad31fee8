#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the given requirements file into it, quietly.
# Used by scripts/run.sh and scripts/test.sh; safe to run again (pip skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="$(command -v python3.11 || command -v python3)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$1"
