#!/usr/bin/env bash
# The GPU checks on a machine that has a CUDA build of torch, onnx and onnxruntime but not this
# package installed (e.g. a lent device machine): the `gpu` tests, then the acceptance script
# (benchmarks/gpu_acceptance.py) with its results in $OUT.
#   OUT=/tmp/gpu-out bash scripts/gpu_run.sh [BUDGET_SECONDS]
set -u -o pipefail  # a failing step's exit code, not tee's, is the script's
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${1:-330}
shift || true  # further arguments go to gpu_acceptance (e.g. --bench-models A,B --no-compile)
mkdir -p "$OUT"
# this checkout's layout (package_dir in setup.cfg) as an importable tree, without building a wheel
SITE=$(mktemp -d)
mkdir -p "$SITE/crossvit" && cp -r crossvit/. "$SITE/crossvit/"
for d in model export runtime benchmarks; do cp -r "$d" "$SITE/crossvit/$d"; done
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
cd /tmp  # not the checkout: its bare crossvit/ folder would shadow the tree above
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, onnx, onnxruntime, onnxscript; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
trc=0
[ "${GPU_RUN_TESTS:-1}" = 0 ] || timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -rs "$REPO/tests/test_runtime.py" "$REPO/tests/test_tensorrt.py" "$REPO/tests/test_bench.py" 2>&1 | tee "$OUT/pytest_gpu.log" || trc=$?
[ $trc = 0 ] || echo "gpu tests exit $trc$([ $trc = 124 ] && echo ' (timed out)')" | tee -a "$OUT/pytest_gpu.log"
timeout $((BUDGET + 150)) python3 -m crossvit.benchmarks.gpu_acceptance --out "$OUT" --budget-seconds "$BUDGET" "$@" 2>&1 | tee "$OUT/acceptance.log"
rc=$?
echo "gpu_acceptance exit $rc$([ $rc = 124 ] && echo ' (timed out: bench_cuda.json holds the batch sizes done)')" | tee -a "$OUT/acceptance.log"
[ $rc = 0 ] && exit $trc  # a failed GPU test fails the run too
exit $rc
