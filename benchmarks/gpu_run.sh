#!/usr/bin/env bash
# Everything measured on the GPU machine, in one call. Usage (from the repository root, on the GPU machine):
#
#   bash benchmarks/gpu_run.sh [STAGE ...]            run stages in the foreground, pack results into $OUT
#   bash benchmarks/gpu_run.sh --detach [STAGE ...]   start them in the background (setsid) and return
#   bash benchmarks/gpu_run.sh --wait SECONDS         wait (at most SECONDS) for a detached run, print progress
#   bash benchmarks/gpu_run.sh --collect              pack what a detached run has written into $OUT/results.tgz
# stages: env cuda-tests kernels train rollout reward ppo scale7b scaling
#
# With two GPUs, stages run in two parallel lanes (one per GPU) so one call measures more. A detached run
# outlives the 10-minute limit of one device call as long as the next call comes before the machine is given
# back. Every stage writes under benchmarks/results/ or kernels/results/; after each stage the files it wrote there are
# copied to $W (outside the checkout, which the next call re-syncs) and packed from there.
# Wheels for what the GPU image lacks (bitsandbytes, liger-kernel, trl 1.12 + datasets, Unsloth and its
# dependencies) travel in .whl/ (docs/GPU.md says how to fetch them). Unsloth patches transformers when it is
# imported, so the benchmarks import it only in subprocesses of their own.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; W=/tmp/gpurun; mkdir -p "$OUT" "$W/logs"
case "${1:-}" in
  --detach) shift; rm -rf "$W"; mkdir -p "$W/logs"
            setsid nohup bash "$0" "$@" > "$W/run.log" 2>&1 < /dev/null & echo "detached: $W/run.log"; exit 0 ;;
  --wait)   end=$((SECONDS + $2)); while [ ! -f "$W/done" ] && [ $SECONDS -lt $end ]; do sleep 10; done
            grep -h "===" "$W"/logs/lane*.txt "$W/run.log" 2>/dev/null; [ -f "$W/done" ] && echo "run finished"; exit 0 ;;
  --collect) cat "$W/run.log" "$W"/logs/lane*.txt 2>/dev/null | tail -n 150
            tar czf "$OUT/results.tgz" -C "$W" . 2>/dev/null; ls -la "$OUT"; exit 0 ;;
esac
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || echo "wheel install failed"
fi
export PYTHONPATH=/tmp/site:$PWD
find benchmarks/results kernels/results -type f -exec md5sum {} + > "$W/synced.md5" 2>/dev/null
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
STAGES=${*:-env cuda-tests kernels train rollout reward}

# stage -> (seconds allowed, command). A stage that overruns is killed and the run goes on: one call of the device
# tool is short, and what the other stages measured must still come back.
declare -A LIMIT=([env]=120 [cuda-tests]=300 [kernels]=240 [train]=260 [rollout]=300 [reward]=150 [ppo]=300
                  [scale7b]=240 [scaling]=220)
declare -A CMD=(
  [env]='nvidia-smi; python3 -c "import torch,transformers,peft,triton; print(torch.__version__, transformers.__version__, peft.__version__, triton.__version__)"; python3 -m lessons_lib'
  [cuda-tests]='python3 -m pytest -q -m cuda tests -p no:cacheprovider --continue-on-collection-errors -rs'
  [kernels]='python3 kernels/bench_all.py && python3 kernels/launch_overhead.py --calls 300 --repeats 5 --out kernels/results/launch_overhead_gpu_host.md'
  [train]="python3 benchmarks/train_step.py --stacks ${TRAIN_STACKS:-hf_peft,unsloth,lessons_graph,fast_graph,fast_graph_offload}"
  [rollout]='python3 benchmarks/rollout.py'
  [reward]='python3 benchmarks/reward_model_gpu.py'
  [ppo]='python3 benchmarks/ppo_iteration.py'
  [scale7b]='python3 benchmarks/ppo_memory.py'
  [scaling]='python3 benchmarks/scaling.py'
)

stage() {  # stage NAME GPU
  local name=$1 gpu=$2 t0=$SECONDS
  echo "=== [$name] on GPU $gpu: start $(date +%T)"
  if [ -z "${CMD[$name]:-}" ]; then echo "unknown stage $name"; return; fi
  if [ "$name" = scaling ]; then visible=$(seq -s, 0 $((NGPU - 1))); else visible=$gpu; fi
  CUDA_VISIBLE_DEVICES=$visible timeout -k 10 "${LIMIT[$name]}" bash -c "${CMD[$name]}" > "$W/logs/$name.log" 2>&1
  local rc=$?
  # Only files that differ from what the call synced: the next device call re-syncs the checkout, which puts the
  # committed (older) results back, and copying those would overwrite what an earlier call measured.
  find benchmarks/results kernels/results -type f -exec md5sum {} + 2>/dev/null | grep -vxF -f "$W/synced.md5" |
    while read -r _ f; do mkdir -p "$W/$(dirname "$f")"; cp "$f" "$W/$f"; done
  echo "=== [$name] done in $((SECONDS - t0)) s (rc $rc$([ $rc = 124 ] && echo ', killed at its time limit'))"
  tail -n 25 "$W/logs/$name.log"
}

# Stages whose numbers depend on the host CPU being quiet (launch-bound training steps), or that need every GPU,
# run after the parallel lanes, one at a time.
ALONE=" train scaling "
parallel=() serial=()
for s in $STAGES; do if [[ "$ALONE" == *" $s "* ]]; then serial+=("$s"); else parallel+=("$s"); fi; done
if [ "$NGPU" -ge 2 ]; then
  lane0=() lane1=(); i=0
  for s in "${parallel[@]}"; do if [ $((i % 2)) -eq 0 ]; then lane0+=("$s"); else lane1+=("$s"); fi; i=$((i + 1)); done
  ( for s in "${lane0[@]}"; do stage "$s" 0; done ) > "$W/logs/lane0.txt" 2>&1 &
  ( for s in "${lane1[@]}"; do stage "$s" 1; done ) > "$W/logs/lane1.txt" 2>&1 &
  wait
else
  for s in "${parallel[@]}"; do stage "$s" 0; done > "$W/logs/lane0.txt" 2>&1
fi
for s in "${serial[@]}"; do stage "$s" 0; done > "$W/logs/lane_serial.txt" 2>&1
cat "$W"/logs/lane*.txt
touch "$W/done"
tar czf "$OUT/results.tgz" -C "$W" . 2>/dev/null; ls -la "$OUT"
