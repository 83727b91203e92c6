#!/usr/bin/env bash
# Create ./.venv and install this project into it (idempotent: a second run only checks).
# TORCH_SPEC overrides the torch pin (e.g. a CUDA build on a GPU workstation).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[bootstrap] installing $TORCH_SPEC"
# shellcheck disable=SC2086
.venv/bin/pip install --quiet $TORCH_SPEC
echo "[bootstrap] installing mprl-orchestrator[test] (editable)"
.venv/bin/pip install --quiet -e ".[test]"
echo "[bootstrap] done: $(du -sh .venv | cut -f1) in .venv"
