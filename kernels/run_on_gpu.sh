#!/usr/bin/env bash
# The kernel measurements and the CUDA kernel tests in one call on the GPU machine (about 3 minutes on an H200):
#
#   bash kernels/run_on_gpu.sh
#
# 1. kernels/bench_all.py: checks, then per call / host / device (CUDA graph) times of every kernel and baseline;
#    writes kernels/results/*.md, *.json and summary.md;
# 2. kernels/launch_overhead.py: the host-side cost of each call on this machine's CPU
#    (results/launch_overhead_gpu_host.md; results/launch_overhead.md is the development machine's, with "before");
# 3. the CUDA tests of the kernels, of lessons_lib.nf4 against bitsandbytes' CUDA quantizer, and of the rollout
#    engine (it runs the RMSNorm and RoPE kernels inside its CUDA graphs; and its 4-bit + LoRA path).
# Logs and a copy of kernels/results/ go to $OUT/kernels/ ($OUT defaults to /tmp/out). Liger-Kernel and
# bitsandbytes come from wheels in .whl/ (docs/GPU.md); without them their rows and tests are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || echo "wheel install failed"
fi
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/kernels"
start=$SECONDS
python3 kernels/bench_all.py 2>&1 | tee "$OUT/kernels/bench_all.log"
python3 kernels/launch_overhead.py --calls 300 --repeats 5 --out kernels/results/launch_overhead_gpu_host.md \
  2>&1 | tee "$OUT/kernels/launch_overhead.log"
python3 -m pytest -q -m cuda -p no:cacheprovider -rsP tests/test_kernels.py tests/test_kernels_patching.py \
  tests/test_kernels_scripts.py tests/test_nf4.py tests/test_fast_generate.py \
  2>&1 | tee "$OUT/kernels/cuda_tests.log"
cp -r kernels/results "$OUT/kernels/"
echo "run_on_gpu.sh: $((SECONDS - start)) s; logs and results in $OUT/kernels/"
