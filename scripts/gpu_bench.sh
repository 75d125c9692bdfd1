#!/usr/bin/env bash
# The GPU checks and throughput figures, on a GPU machine with torch, transformers, pyarrow and rich (no Ray,
# no internet needed). Run from the repository root:
#
#   bash scripts/gpu_bench.sh 1b      # Llama-3.2-1B shape, 100k captions
#   bash scripts/gpu_bench.sh 8b      # Llama-3-8B shape, 20k captions (each path ~1-3 min on an H100)
#
# Writes gpu_tests.log and bench_embed_gpu_<shape>.json under $OUT (default bench-out/).
set -euo pipefail
shape=${1:-1b}
out=${OUT:-bench-out}
mkdir -p "$out"
case "$shape" in
  1b) n=${N:-100000} ;;
  8b) n=${N:-20000} ;;
  tiny) n=${N:-200} ;;
  *) echo "usage: $0 1b|8b|tiny" >&2; exit 2 ;;
esac
python3 -c "import l2c.pipeline" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt" || true
python3 -m pytest -q -p no:cacheprovider -m gpu tests/pipeline/test_encoder_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 benchmarks/bench_embed_gpu.py --shape "$shape" --n "$n" --out "$out"
