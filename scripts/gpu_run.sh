#!/usr/bin/env bash
# The GPU checks on a machine that has a CUDA build of torch, onnx and onnxruntime but not this
# package installed (e.g. a lent device machine): the `gpu` tests, then the acceptance script
# (benchmarks/gpu_acceptance.py) with its results in $OUT.
#   OUT=/tmp/gpu-out bash scripts/gpu_run.sh [BUDGET_SECONDS] [gpu_acceptance options]
# TensorRT-RTX: where `tensorrt_rtx` is not importable, the `rtx` extra's requirements (read from
# setup.cfg: tensorrt-rtx==1.7.1.116 from PyPI, cuda-python>=13,<14, polygraphy) are pip-installed
# first; GPU_RUN_RTX=0 (or --skip-rtx) neither installs nor runs that step. Without network access
# (a lent machine reaches nothing) the install fails, says so, and the step is a SKIP with the
# reason; pip's own PIP_* variables (PIP_USER=1, PIP_INDEX_URL, ...) apply. RTX plans run on
# Ampere/Ada/Blackwell RTX GPUs and the A100: there the step gates and times them. On an H100 or
# H200 (compute capability 9.0, not an RTX target) no RTX plan runs, and the step's expected,
# passing answer is a one-line refusal from the tensorrt backend plus the ONNX Runtime fallback
# (each message in $OUT/tensorrt_rtx.json), and a refused build for compute capability 9.0.
set -u -o pipefail  # a failing step's exit code, not tee's, is the script's
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${1:-330}
shift || true  # further arguments go to gpu_acceptance (e.g. --bench-models A,B --no-compile)
mkdir -p "$OUT"
RTX=${GPU_RUN_RTX:-1}
for a in "$@"; do [ "$a" = --skip-rtx ] && RTX=0; done
ACCEPT_ARGS=("$@")
[ "$RTX" = 0 ] && [[ " $* " != *" --skip-rtx "* ]] && ACCEPT_ARGS+=(--skip-rtx)
# this checkout's layout (package_dir in setup.cfg) as an importable tree, without building a wheel
SITE=$(mktemp -d)
mkdir -p "$SITE/crossvit" && cp -r crossvit/. "$SITE/crossvit/"
for d in model export runtime benchmarks; do cp -r "$d" "$SITE/crossvit/$d"; done
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
cd /tmp  # not the checkout: its bare crossvit/ folder would shadow the tree above
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null ||
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, onnx, onnxruntime, onnxscript; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
if [ "$RTX" != 0 ]; then
  if python3 -c "import tensorrt_rtx" 2>/dev/null; then
    echo "tensorrt_rtx $(python3 -c 'import tensorrt_rtx; print(tensorrt_rtx.__version__)') is installed"
  else
    # the rtx extra as setup.cfg has it (this package itself is not installed, so not `pip install .[rtx]`)
    mapfile -t REQS < <(python3 - "$REPO/setup.cfg" <<'EOF'
import configparser, sys
c = configparser.ConfigParser(interpolation=None)
c.read(sys.argv[1])
print("\n".join(line.strip() for line in c["options.extras_require"]["rtx"].splitlines() if line.strip()))
EOF
)
    if python3 -c "import tensorrt" 2>/dev/null; then  # standard TensorRT keeps the cuda-python of its CUDA major
      for i in "${!REQS[@]}"; do [[ ${REQS[$i]} == cuda-python* ]] && unset 'REQS[i]'; done
      echo "standard TensorRT is installed: keeping its cuda-python"
    fi
    echo "installing the rtx extra: ${REQS[*]}"
    timeout 600 python3 -m pip install --disable-pip-version-check --retries 1 --timeout 30 "${REQS[@]}" \
      > "$OUT/rtx_install.log" 2>&1
    prc=$?
    if [ $prc = 0 ]; then
      python3 -c "import tensorrt_rtx; print('tensorrt_rtx', tensorrt_rtx.__version__, 'installed')"
    else
      echo "the rtx extra was not installed (pip exit $prc$([ $prc = 124 ] && echo ', timed out'); $OUT/rtx_install.log):" \
           "the TensorRT-RTX step will be a SKIP. pip said: $(grep -E '^(ERROR|error)' "$OUT/rtx_install.log" | tail -n 1)"
    fi
  fi
fi
trc=0
[ "${GPU_RUN_TESTS:-1}" = 0 ] || timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -rs "$REPO/tests/test_runtime.py" "$REPO/tests/test_tensorrt.py" "$REPO/tests/test_bench.py" 2>&1 | tee "$OUT/pytest_gpu.log" || trc=$?
[ $trc = 0 ] || echo "gpu tests exit $trc$([ $trc = 124 ] && echo ' (timed out)')" | tee -a "$OUT/pytest_gpu.log"
# the budget is the benchmark step's; the engine steps come after it (the RTX one: exports, int8
# calibration and six builds of seconds each, then the gate or the refusal and fallback)
timeout $((BUDGET + 150 + (RTX != 0 ? 150 : 0))) python3 -m crossvit.benchmarks.gpu_acceptance --out "$OUT" \
  --budget-seconds "$BUDGET" ${ACCEPT_ARGS[@]+"${ACCEPT_ARGS[@]}"} 2>&1 | tee "$OUT/acceptance.log"
rc=$?
echo "gpu_acceptance exit $rc$([ $rc = 124 ] && echo ' (timed out: bench_cuda.json holds the batch sizes done, tensorrt*.json the rows done)')" | tee -a "$OUT/acceptance.log"
{
  echo "results in $OUT:"
  for f in pytest_gpu.log acceptance.log bench_cuda.json bench_cuda.csv tensorrt.json tensorrt_rtx.json; do
    if [ -e "$OUT/$f" ]; then echo "  $f"; else echo "  $f: not written (its step was skipped or did not run; acceptance.log says why)"; fi
  done
  [ "$RTX" = 0 ] || python3 - "$OUT/tensorrt_rtx.json" <<'EOF' || true
import json, sys
from collections import Counter
try:
    d = json.load(open(sys.argv[1]))
except OSError:
    sys.exit()
g = d["gpu"]
cc = ".".join(map(str, g["compute_capability"]))
got = Counter((r.get("route", "not built"), r["verdict"]) for r in d["rows"])
print(f"  TensorRT-RTX {d['library']['version']} on {g['name']} (compute capability {cc}): "
      + ", ".join(f"{n} row(s) {route}: {verdict}" for (route, verdict), n in sorted(got.items())))
if any(r.get("route") == "refusal+fallback" for r in d["rows"]):
    print("  this GPU is not a TensorRT-RTX target (as H100/H200 are not): the expected answer is a one-line refusal "
          "from the tensorrt backend and the ONNX Runtime fallback; each refusal's text is in tensorrt_rtx.json")
ref = d.get("compute_capability_refusal") or {}
print(f"  build for compute capability 9.0: {ref.get('verdict')} ({ref.get('message') or ref.get('error')})")
EOF
} | tee -a "$OUT/acceptance.log"
[ $rc = 0 ] && exit $trc  # a failed GPU test fails the run too
exit $rc
