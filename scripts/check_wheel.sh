#!/usr/bin/env bash
# Prove the non-editable install works: build the wheel, install it into a fresh venv outside
# the checkout, and run `crossvit deploy` and `crossvit predict` from another directory on the
# images shipped inside the installed package. CI runs this after the test suite.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# torch as the Makefile installs it (TORCH, TORCH_INDEX: scripts/install_torch.sh), in its own pip call
export TORCH="${TORCH:-torch==2.13.0}"
export TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
work="$(mktemp -d "${TMPDIR:-/tmp}/crossvit-wheel-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "== building the wheel"
# from a copy of the tracked (and new, not ignored) files: a stale build/ folder in the checkout
# could otherwise put deleted modules into the wheel
mkdir "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard -z | tar -cf - --null -T -) | tar -xf - -C "$work/src"
"$PYTHON" -m venv "$work/build-env"
"$work/build-env/bin/pip" wheel -q --no-deps -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/crossvit-*.whl)"
echo "   $(basename "$wheel") ($(du -k "$wheel" | cut -f1) kB)"

echo "== installing it into a fresh venv"
"$PYTHON" -m venv "$work/v"
bash "$repo/scripts/install_torch.sh" "$work/v"
"$work/v/bin/pip" install -q "$wheel"

cd "$work"  # nowhere near the checkout: nothing can be found through the source tree
if "$work/v/bin/python" -c "import crossvit, sys; sys.exit(not crossvit.__file__.startswith('$repo'))"; then
    echo "crossvit was imported from the checkout, not from the wheel" >&2
    exit 1
fi
# every subpackage made it into the wheel (the serving code needs the [serve] extra to run, not to import)
"$work/v/bin/python" -c "import crossvit.runtime.serving.protocol, crossvit.runtime.tensorrt, crossvit.export.engine, crossvit.export.triton, crossvit.benchmarks.suite, crossvit.pipeline"
# an install hint from a wheel names the extra's packages (crossvit is not on PyPI): `bench --plot`
# without matplotlib (the bench extra) refuses in one line before any work
hint="$("$work/v/bin/crossvit" bench --plot "$work/plot.png" 2>&1 >/dev/null || true)"
case "$hint" in
    *"needs matplotlib: pip install 'matplotlib>=3.8'") echo "   install hint from the wheel: $hint" ;;
    *) echo "bench --plot without matplotlib said: $hint" >&2; exit 1 ;;
esac
images="$("$work/v/bin/python" -c 'from crossvit.assets import heldout_images; print(heldout_images())')"
echo "== crossvit deploy (from $work, images in $images)"
"$work/v/bin/crossvit" deploy -o "$work/out" --variants int8-cpu
echo "== crossvit predict on the shipped images"
"$work/v/bin/crossvit" predict "$work/out/crossvit_digits.fp32.onnx" "$images" --top-k 1 > "$work/predict.txt"
n="$(wc -l < "$work/predict.txt")"
[ "$n" -eq 360 ] || { echo "predict answered $n images, expected 360" >&2; exit 1; }
echo "wheel check: passed (deploy and predict ran from a wheel install; $n images answered)"
