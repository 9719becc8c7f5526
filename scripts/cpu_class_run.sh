#!/usr/bin/env bash
# Measure the CPU path of crossvit_15_240 on this machine, as issue 22's targets ask, in one go:
# a deploy (int8-cpu and int8-ov beside fp32; deploy chooses and records the CPU path), two
# `--retune` runs, `crossvit bench --compile` at batches 1 and 8 on the deploy's files, and each
# OpenVINO path opened in a fresh process (is its first model held to its gate's answer?).
# Each log starts with the CPU (lscpu model, family/model, cores, speed flags), the load average
# and the commit. About 30 minutes on a 2-core machine; run it with nothing else running.
#
#   bash scripts/cpu_class_run.sh [RESULTS_DIR] [WORK_DIR]
#
# MODEL (environment) picks another registered model than crossvit_15_240 (a quick try of this
# script: MODEL=crossvit_tiny_240). RESULTS_DIR defaults to
# benchmarks/results/<class>_<cores>core/cpu_choice_run, where <class> is cpu_<vendor> (AVX-512
# VNNI), cpu_<vendor>_amx (amx_int8) or cpu_<vendor>_avx2 (neither), <vendor> epyc for AMD, xeon
# for Intel; WORK_DIR (the deploy's output, kept) defaults to /tmp/cpu_class_run. Last, it writes
# table.md: the README's "Where each CPU class stands" rows (scripts/cpu_class_table.py).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0;; -*) echo "cpu_class_run: unknown option $1 (--help)" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
CROSSVIT=${CROSSVIT:-.venv/bin/crossvit}
MODEL=${MODEL:-crossvit_15_240}
[ -x "$CROSSVIT" ] || { echo "cpu_class_run: $CROSSVIT not found: run \`make .venv/.installed-run\` first" >&2; exit 2; }
# the OpenVINO paths are what this run is for: without them it would measure only ONNX Runtime's
"$(dirname "$CROSSVIT")/python" -c 'import openvino, nncf' 2>/dev/null || {
    echo "cpu_class_run: OpenVINO or NNCF cannot be imported here: run \`make .venv/.installed-run\` (the openvino extra)" >&2; exit 2; }

flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n')
has() { grep -qx "$1" <<<"$flags"; }
case "$(grep -m1 '^vendor_id' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')" in
    AuthenticAMD) vendor=epyc;; GenuineIntel) vendor=xeon;; *) vendor=other;; esac
if has amx_int8; then class=cpu_${vendor}_amx; elif has avx512_vnni; then class=cpu_$vendor; else class=cpu_${vendor}_avx2; fi
results=${1:-benchmarks/results/${class}_$(nproc)core/cpu_choice_run}
work=${2:-/tmp/cpu_class_run}
mkdir -p "$results"
[ -e "$work" ] && { echo "cpu_class_run: $work exists: remove it or name another WORK_DIR" >&2; exit 2; }

header() {  # the machine, its load and the commit, as the first lines of a log
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# $(lscpu | grep -m1 '^Model name' | sed 's/  */ /g'); family $(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ') model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | tr -d ' '); $(nproc) cores"
    echo "# speed flags: $(grep -xE 'avx2|fma|avx512f|avx512_vnni|avx512_bf16|avx512_fp16|amx_[a-z0-9]+' <<<"$flags" | sort | tr '\n' ' ')"
    echo "# $(uptime)"
    echo "# $*"
}

run() {  # LOG COMMAND...: the header, then the command's output, timed
    local log=$1; shift
    echo "cpu_class_run: $* > $log" >&2
    local rc=0
    { header "$@"; { time "$@"; } 2>&1; } > "$log" 2>&1 || rc=$?
    grep -vE '^(real|user|sys)[[:space:]]|^$' "$log" | tail -n 1 >&2
    [ "$rc" -eq 0 ] || { echo "cpu_class_run: that step failed (exit $rc); its whole output is in $log" >&2; exit "$rc"; }
}

run "$results/deploy.log" "$CROSSVIT" deploy --model $MODEL --batch 1:16 \
    --calibration crossvit/assets/heldout --variants int8-cpu,int8-ov -o "$work"
cp "$work"/$MODEL.cpu.json "$work"/*.parity.json "$work"/summary.json "$results"/
for r in a b; do
    run "$results/retune_$r.log" "$CROSSVIT" deploy --retune -o "$work"
    cp "$work/$MODEL.cpu.json" "$results/$MODEL.cpu.retune_$r.json"
done
run "$results/bench_${MODEL}.log" "$CROSSVIT" bench --model $MODEL --compile \
    --batch-sizes 1,8 --no-accuracy --json "$results/bench_${MODEL}.json" \
    --csv "$results/bench_${MODEL}.csv" \
    "$work/$MODEL.fp32.onnx" "$work/$MODEL.int8-cpu.onnx" "$work/$MODEL.int8-ov.onnx"
# each OpenVINO path opened in a fresh process: is its first model held to its gate's recorded answer?
run "$results/yardstick.log" "$(dirname "$CROSSVIT")/python" -c '
import sys
from crossvit.runtime.session import open_session
stem = sys.argv[1]
for name, hint in (("int8-ov", "fp32"), ("int8-ov", "bf16"), ("fp32", "fp32"), ("fp32", "bf16")):
    try:
        with open_session(f"{stem}.{name}.onnx", backend="openvino", hint=hint) as s:
            print(f"{name} file, {hint} hint: {s.yardstick}")
    except Exception as e:
        print(f"{name} file, {hint} hint: {type(e).__name__}: {e}")
' "$work/$MODEL"
"$(dirname "$CROSSVIT")/python" scripts/cpu_class_table.py "$results" > "$results/table.md"
echo "cpu_class_run: results in $results (the README's rows: table.md); the choices:" >&2
grep -h '^CPU path for' "$results"/deploy.log "$results"/retune_*.log >&2 || true
