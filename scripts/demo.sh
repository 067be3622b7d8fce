#!/usr/bin/env bash
# The demo command: set up ./.venv (as the test command does) and run the late-phase SAM demo
# on the embedded CIFAR-10 subset; prints a comparison table, writes runs/demo/comparison.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/samfast-demo "$@"
