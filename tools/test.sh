#!/usr/bin/env bash
# Set up (first time only), then run the test suite (CPU; distributed tests use torchrun+gloo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec .venv/bin/python -m pytest -q tests "$@"
