#!/usr/bin/env bash
# One device call's worth of GPU work, in order of value, each part writing under $OUT (default ./gpu_out):
#   1. JIT-build the kernels and run every GPU-marked test (kernel parity, fused decode steps, graphs)
#   2. decode / prefill: per-op step vs the fused block step (csrc/layer_step.cu), 353M and 972M shapes
#   3. speculative decoding cost model at the paper's shapes with graph-replayed verification
#   4. the scan against the ANCHORS shapes
#   5. kernel-time profiles: prefill (972M), a training step (353M), decode steps per-op and fused (353M)
#   6. training throughput at the 353M and 972M shapes (batch 4 x 8192, bf16 autocast)
#   7. every compiled scan kernel variant at the ANCHORS shapes (bench_scan.py --sweep)
# Usage (repository root, on a CUDA machine): bash benchmarks/gpu_session.sh [parts, default "1 2 3 4"]
# A part that fails is reported and the next one still runs; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export MAMBABYTE_CACHE_DIR=${MAMBABYTE_CACHE_DIR:-/tmp/mbc}
export MAMBABYTE_CUDA_ARCH_LIST=${MAMBABYTE_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
parts=${1:-"1 2 3 4 5 6"}
status=0
{ date -u; git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader; } > "$OUT/meta.txt"

run() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

for p in $parts; do
  case $p in
    1) run build python3 -c "from mambabyte.ops import cuda_backend as c; print(c.status())"
       run gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
    2) run bench_generate python3 benchmarks/bench_generate.py --skip_cpu --skip_eager --decode_bytes 256 \
         --batch_sizes 1 2 4 8 --fused_block_step both --json "$OUT/generate.json" ;;
    3) run bench_speculative python3 benchmarks/bench_speculative.py --device cuda --shapes 353M 972M \
         --ks 4 8 16 --verify_cuda_graph --json "$OUT/speculative.json" ;;
    4) run bench_scan python3 benchmarks/bench_scan.py --quick --json "$OUT/scan.json" ;;
    5) run profile_prefill python3 benchmarks/profile_model.py --what prefill --preset 972M
       run profile_train python3 benchmarks/profile_model.py --what train --preset 353M --batch 4
       run profile_decode python3 benchmarks/profile_model.py --what decode --preset 353M
       run profile_decode_fused python3 benchmarks/profile_model.py --what decode --preset 353M --fused_block_step ;;
    6) run bench_train python3 benchmarks/bench_train.py --steps 6 --warmup 2 --json "$OUT/train.json" ;;
    7) run bench_scan_sweep python3 benchmarks/bench_scan.py --quick --sweep --json "$OUT/scan_sweep.json" ;;
  esac
done
exit $status
