#!/usr/bin/env bash
# Install torch into a venv, in its own pip call (before the project), and say where it came from.
#   scripts/install_torch.sh VENV        (the Makefile and scripts/check_wheel.sh call it)
# TORCH        the requirement, one argument (default torch==2.13.0)
# TORCH_INDEX  the index torch comes from (default PyTorch's CPU index,
#              https://download.pytorch.org/whl/cpu: the CPU build, about 200 MB);
#              empty: pip's own sources, which on plain PyPI is the CUDA build on Linux x86-64
#              (several GB); or another of PyTorch's indexes (https://download.pytorch.org/whl/cu1XX).
# The index is probed once (10 s). Where it cannot be reached, a wheel of TORCH that pip finds on
# local disk (its --find-links) serves, as on our CI machines; without one the script stops with
# one line rather than pull the multi-GB CUDA build from PyPI unasked.
set -euo pipefail
venv="${1:?usage: scripts/install_torch.sh VENV}"
TORCH="${TORCH:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
pip="$venv/bin/pip"
python="$venv/bin/python"

said() {  # the installed torch's version (its local label names the build: +cpu, +cu128; none: PyPI's CUDA build)
    "$python" -c 'from importlib.metadata import version; print("torch", version("torch"))'
}

had="$(said 2>/dev/null || true)"
where() {  # $1: where torch comes from when this call installed it
    now="$(said)"
    if [ "$now" = "$had" ]; then echo "$now, already installed in $venv"; else echo "$now, $1"; fi
}

if [ -z "$TORCH_INDEX" ]; then
    "$pip" install -q "$TORCH"
    where "from pip's own sources (TORCH_INDEX is empty; on plain PyPI that is the CUDA build)"
    exit 0
fi
if "$python" - "$TORCH_INDEX" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except Exception:
    sys.exit(1)
EOF
then
    # --index-url for this call only: the project's own packages come from pip's usual index
    "$pip" install -q --index-url "$TORCH_INDEX" "$TORCH"
    where "from $TORCH_INDEX"
    exit 0
fi
# --no-index: local wheels only (pip's --find-links); torch's own dependencies come next, from
# pip's usual index, in a second call that finds torch already installed
if "$pip" install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
    "$pip" install -q "$TORCH"
    where "from a local wheel ($TORCH_INDEX cannot be reached from this machine)"
    exit 0
fi
echo "error: $TORCH_INDEX cannot be reached from this machine and pip has no local wheel of $TORCH;" \
     "set TORCH_INDEX to an index that has it, or TORCH_INDEX= (empty) for PyPI's build (on Linux x86-64" \
     "the CUDA build, several GB)" >&2
exit 1
