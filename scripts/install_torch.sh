#!/usr/bin/env bash
# torch on its own, before the project (pip resolving it together with other packages takes PyPI's CUDA build):
# the CPU build by default, PyPI's CUDA build with GPU=1.  Usage: GPU= TORCH=torch==2.13.0 install_torch.sh PYTHON
set -euo pipefail
PY=$1
TORCH=${TORCH:-torch==2.13.0}
if [ -n "${GPU:-}" ]; then
    exec "$PY" -m pip install -q "$TORCH"
fi
# A CPU wheel that pip's find-links already offer (as on this project's machines) wins; else PyTorch's CPU index.
# torch's own dependencies come with the project's install, pinned by constraints.txt.
if "$PY" -m pip install -q --no-deps --no-index "$TORCH" 2>/dev/null; then
    exit 0
fi
exec "$PY" -m pip install -q --no-deps --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "$TORCH"
