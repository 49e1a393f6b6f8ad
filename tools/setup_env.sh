#!/usr/bin/env bash
# Create .venv (once) with the CPU build of PyTorch and this package with its test extras.
# Sourced by tools/finetune.sh and tools/test.sh, so each README command sets itself up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import llm_finetune, pytest, xdist" 2>/dev/null; then
  python3 -m venv .venv
  # PyTorch first, pinned, so that the package's "torch>=2.6" is already met (a CPU build
  # here; on a GPU machine install the CUDA build of your choice before this script).
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[test]"
fi
