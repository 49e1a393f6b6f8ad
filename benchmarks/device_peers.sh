#!/usr/bin/env bash
# docs/performance.md, "Against tuned peers": benchmarks/peers.py on the GPU machine, with the
# GPU's measured bf16 matmul rate first (the physical ceiling the MFU columns are read against).
#   bash benchmarks/peer_wheels.sh                       (here; carry .whl and .whl-peers)
#   bash benchmarks/device_peers.sh OUT lora_8b[,qlora_8b,full_1b] [STEPS]
set -uo pipefail
out=${1:?output directory}; only=${2:-lora_8b,qlora_8b,full_1b}; steps=${3:-6}
mkdir -p "$out"
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "$@"; }
pip --target /tmp/site .whl/*.whl || exit 1
pip --target /tmp/site-unsloth .whl-peers/*.whl .whl/bitsandbytes-*.whl .whl/fire-*.whl \
  .whl/termcolor-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 - <<'PY' | tee -a "$out/gpu.txt"
import time, torch, transformers, peft, bitsandbytes, liger_kernel
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(10): a @ b
torch.cuda.synchronize(); start = time.perf_counter()
for _ in range(50): a @ b
torch.cuda.synchronize()
rate = 50 * 2 * 8192**3 / (time.perf_counter() - start)
print(f"bf16 matmul 8192^3: {rate / 1e12:.0f} TFLOP/s; torch {torch.__version__}, transformers "
      f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
PY
python3 - <<'PY' 2>&1 | tail -3 | tee -a "$out/gpu.txt"
# the packed-batch attention's kernel against per-sample SDPA (tests/test_attention.py's check)
import torch, torch.nn.functional as F
from llm_finetune import attention
attention.register()
q = torch.randn(96, 8, 64, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(96, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
starts = torch.tensor([0, 30, 50, 64, 96], dtype=torch.int32, device="cuda")
got = attention._VARLEN(q, k, v, starts, starts, 64, 64, 0.125)
worst = 0.0
for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
    ref = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(4, 0),
                                         v[a:b].transpose(0, 1).repeat_interleave(4, 0), is_causal=True, scale=0.125)
    worst = max(worst, (got[a:b] - ref.transpose(0, 1)).abs().max().item())
print(f"varlen kernel against per-sample SDPA: largest difference {worst:.2e}")
PY
python3 benchmarks/peers.py --only "$only" --steps "$steps" --out "$out/peers.json" ${PEERS_ARGS:-} \
  --workdir /tmp/peers --unsloth_site /tmp/site-unsloth 2>&1 | tee "$out/peers.log" | grep -v "^{"
for d in /tmp/peers/*/; do [ -f "$d/run.log" ] && cp "$d/run.log" "$out/$(basename "$d").log"; done
