#!/usr/bin/env bash
# Set up (first time only), then fine-tune: the embedded default with no arguments.
# The quickstart replaces its previous result in output/ (a resumed run keeps it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec .venv/bin/python -m llm_finetune.finetuning --overwrite_output_dir True "$@"
