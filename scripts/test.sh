#!/usr/bin/env bash
# The test command: set up ./.venv and run the whole test suite (pytest args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest "$@"
