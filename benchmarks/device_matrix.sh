#!/usr/bin/env bash
# The GPU matrix on the device machine (docs/gpu_runs.md has the results).
#   bash benchmarks/device_matrix.sh OUT [--only NAME,...] [--parallel N]
# Expects the wheels of ../shared/tools/device-wheels.sh in .whl/ (bitsandbytes, datasets, fire).
set -uo pipefail
out=${1:?output directory}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
mkdir -p "$out"
work=${MATRIX_WORK:-/tmp/matrix}; rm -rf "$work"
python3 benchmarks/device_matrix.py --out "$work" "$@"
cp "$work/matrix.md" "$work/matrix.json" "$out/" 2>/dev/null
tar czf "$out/logs.tgz" -C "$work/cells" --exclude='*.safetensors' --exclude='*.distcp' \
  --exclude='*.pt' --exclude='*.bin' . 2>/dev/null
