#!/usr/bin/env bash
# Create ./.venv (once) and install samfast with what the tests, demo and benchmarks need.
# torch 2.14.1 / torchvision 0.29.1 come from this machine's local pip cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,train]"
