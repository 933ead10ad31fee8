#!/usr/bin/env bash
# Install what the app needs (first run only takes long) and serve it on http://localhost:8501
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements.txt
exec .venv/bin/streamlit run app.py "$@"
