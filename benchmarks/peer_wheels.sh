#!/usr/bin/env bash
# The wheels benchmarks/peers.py needs on the GPU machine (../shared/tools/device-wheels.sh, the
# workplace's wheel fetcher, for ours), trimmed to fit its 64 MiB
# carry: ours (.whl: bitsandbytes with the CUDA 13.0 library only, datasets, fire, liger-kernel)
# and Unsloth's (.whl-peers: Unsloth without its web UI and the versions it pins, installed
# apart, since it refuses datasets 5).
#   bash benchmarks/peer_wheels.sh      (in the project root; then carry .whl and .whl-peers)
set -euo pipefail
rm -rf .whl .whl-peers
bash ../shared/tools/device-wheels.sh .whl liger-kernel==0.8.5 >/dev/null
python3 benchmarks/trim_wheel.py .whl/bitsandbytes-*.whl --drop 'bitsandbytes/libbitsandbytes_*' \
  --keep 'bitsandbytes/libbitsandbytes_cuda130.so,bitsandbytes/libbitsandbytes_cpu.so'
mkdir -p .whl-peers
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl-peers unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.3.0 \
  "dill<0.4.1" "multiprocess<0.70.17" tyro docstring_parser typeguard msgspec einops \
  cut_cross_entropy sentencepiece
python3 benchmarks/trim_wheel.py .whl-peers/unsloth-2*.whl --drop 'studio/*'
du -sh .whl .whl-peers
