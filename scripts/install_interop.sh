#!/usr/bin/env bash
# Builds .venv-interop: the reference implementations l2c is checked against (`make test-interop`).
#   * llm2vec 0.2.3, the library the official LLM2CLIP extraction runs (it pins transformers <= 4.44.2,
#     so it cannot share .venv, whose transformers is >= 4.56);
#   * clip-benchmark, whose recall@K is compared with l2c's;
#   * open-clip-torch, which loads `l2c export --format open_clip` (with timm and torchvision, its imports).
# l2c itself is not installed here: the interop tests run in .venv and call this venv's python as a
# subprocess (tests/interop/llm2vec_reference.py) that writes the reference vectors to a file.
# Idempotent: a stamp holding this script's hash makes a rerun a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${INTEROP_VENV:-.venv-interop}
TORCH=${TORCH:-torch==2.13.0}
LLM2VEC=${LLM2VEC:-llm2vec==0.2.3}
STAMP="$VENV/.l2c-interop-installed"
WANT="$(sha256sum "$0" | cut -d' ' -f1) $LLM2VEC $TORCH"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c "import llm2vec, open_clip" 2>/dev/null; then
    echo "$VENV is up to date ($LLM2VEC, $TORCH)"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
# torch alone first, the CPU build (the project's one torch installer; its dependencies come next).
GPU= TORCH="$TORCH" bash scripts/install_torch.sh "$VENV/bin/python"
# llm2vec's own pins (transformers>=4.43.1,<=4.44.2); peft 0.13 is the last one that imports beside 4.44.
# Its evaluation extras (datasets, evaluate, scikit-learn) are not needed to encode: --no-deps, then what
# `import llm2vec` needs.
"${PIP[@]}" install -q --no-deps "$LLM2VEC"
"${PIP[@]}" install -q "$TORCH" "transformers==4.44.2" "peft==0.13.2" "tokenizers<0.20" numpy tqdm \
    safetensors accelerate
# clip-benchmark without open_clip/torchvision (PyPI torchvision does not import beside the local torch
# wheel): the tests import only its retrieval metric module, which needs torch, numpy and tqdm.
"${PIP[@]}" install -q --no-deps "clip-benchmark==1.6.2"
# open_clip and its imports. torchvision 0.28.0 is the release built for torch 2.13.0; the index has only its
# CUDA-linked wheel, whose compiled ops (nms, roi_align: detection, unused by open_clip) cannot load beside the
# CPU torch wheel. Its Python side (the PIL transforms open_clip's preprocessing uses) works without them;
# tests/interop/reference.py declares the two op schemas torchvision's import registers fakes for when that
# library did not load. --no-deps keeps this venv's torch.
"${PIP[@]}" install -q --no-deps "torchvision==0.28.0" "open-clip-torch==3.3.0" "timm==1.0.29" "ftfy==6.3.1"
"${PIP[@]}" install -q pillow regex wcwidth pyyaml

"$VENV/bin/python" - <<'PY'
import torch, transformers, llm2vec  # noqa: F401
from llm2vec import LLM2Vec  # noqa: F401
from clip_benchmark.metrics import zeroshot_retrieval  # noqa: F401
import importlib.metadata as md
print("open-clip-torch", md.version("open-clip-torch"), "torchvision", md.version("torchvision"))
print(f"llm2vec {llm2vec.__version__ if hasattr(llm2vec, '__version__') else '0.2.3'}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "$WANT" > "$STAMP"
