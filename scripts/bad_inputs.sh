#!/usr/bin/env bash
# Bad input and faults, tried as a new user would on small generated data: each case, its exit status and the
# first line it printed (the behaviour section of docs/reference.md says what each gets). Usage:
#   bash scripts/bad_inputs.sh [WORK_DIR]      (a new temp dir by default; ~5 min on 2 cores)
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"; PY="$ROOT/.venv/bin/python"; L2C="$PY -m l2c.cli"
W="${1:-$(mktemp -d)}"; mkdir -p "$W"; cd "$W" || exit 2; echo "working in $W"
export PYTHONWARNINGS=ignore
row() { # name, then the command
  local name="$1"; shift
  "$@" > out.txt 2> err.txt; local rc=$?
  local line; line=$(grep -h "l2c: " err.txt | head -1 | cut -c1-260)
  [ -z "$line" ] && line=$(grep -h "WARNING" err.txt | head -1 | cut -c1-260)
  [ -z "$line" ] && line=$(grep -h "duplicate\|rejected\|wrote\|exported" out.txt err.txt | head -1 | cut -c1-200)
  printf '| %s | %s | %s |\n' "$name" "$rc" "$line"
}
$L2C make-demo-data data --n 96 --val-n 32 --shard-size 32 --image-size 32 > /dev/null 2>&1
$L2C embed-captions data/train --out cache --model minilm --text-field txt --text-field json:long_caption --no-progress > /dev/null 2>&1
$L2C embed-captions data/val --out vcache --model minilm --text-field txt --text-field json:long_caption --no-progress > /dev/null 2>&1
TV="$L2C train-vision --images data/train --text-cache cache --config demo steps=4 batch_size=16 checkpoint_every=2 log_every=1 data.workers=0 optim.warmup_steps=0 --no-progress"
$TV --out run > /dev/null 2>&1; echo "run made: $?"
echo "| case | exit | line |"; echo "|---|---|---|"
echo keep > afile
row "export --out FILE" $L2C export run --format llm2clip-hf --out afile
mkdir userdir; echo mine > userdir/notes.txt
row "export --out a folder of the user's files" $L2C export run --format llm2clip-hf --out userdir
row "export --out RUN (the run itself)" $L2C export run --format llm2clip-hf --out run
row "export --out ." $L2C export run --format llm2clip-hf --out .
echo "user files intact: $(cat afile) $(cat userdir/notes.txt) run ckpts: $(ls run/checkpoints | wc -l)"
$PY - <<'PY'
import pyarrow.parquet as pq, pyarrow as pa, numpy as np, shutil, glob, json
shutil.copytree("cache", "nancache")
f = sorted(glob.glob("nancache/*.parquet"))[0]
t = pq.read_table(f); e = np.array(t.column("embedding").to_pylist(), np.float32); e[3, 5] = np.nan
col = pa.FixedSizeListArray.from_arrays(pa.array(e.ravel().astype(np.float16)), e.shape[1])
pq.write_table(t.set_column(t.schema.get_field_index("embedding"), "embedding", col), f)
PY
row "NaN vectors in a cache shard" $L2C train-vision --images data/train --text-cache nancache --out runnan --config demo steps=4 batch_size=16 data.workers=0 optim.warmup_steps=0 --no-progress
$TV steps=400 --out run2 > /dev/null 2>&1 &
P=$!; for i in $(seq 200); do [ -f run2/.l2c-lock.json ] && break; sleep 0.1; done
row "second train-vision into the same --out" $TV steps=400 --out run2
kill -INT $P; wait $P; echo "first run after SIGINT: exit $?"
row "resume with changed optim.lr" $TV --out run optim.lr=0.1 steps=6
row "resume with steps=6 (safe)" $TV --out run steps=6
row "batch larger than the data (64 on 32 images)" $L2C train-vision --images data/train/shard-000000.tar --text-cache cache --out runbig --config demo steps=1 batch_size=64 data.workers=0 optim.warmup_steps=0 --no-progress
printf '{"key": "a", "txt": "x"}\n' > s1.jsonl; printf '{"key": "a", "txt": "y"}\n' > s2.jsonl
row "same key in two sources" $L2C embed-captions s1.jsonl s2.jsonl --out dupcache --model minilm --no-progress
row "--text-field no record has" $L2C embed-captions s1.jsonl --out nofield --model minilm --text-field json:nope --no-progress
: > empty.jsonl
row "empty JSONL" $L2C embed-captions empty.jsonl --out emptycache --model minilm --no-progress
mkdir zt; : > zt/shard-000000.tar
row "zero-byte tar in eval-retrieval" $L2C eval-retrieval --model run --images zt/shard-000000.tar --text-cache vcache --out ev0
row "make-shards --out an existing file" $L2C make-shards data --captions s1.jsonl --out afile
row "train-vision --out an existing file" $TV --out afile
row "eval-retrieval, figures in eval.json" $L2C eval-retrieval --model run --images data/val --text-cache vcache --out ev
$PY -c "import json; d=json.load(open('ev/eval.json')); print('eval.json R@1:', d['image_to_text'])"
stat -c '%a %n' run/export/*.safetensors run/checkpoints/*/model.safetensors | head -3
for sig in INT TERM; do
  $L2C make-demo-data big$sig --n 3000 --val-n 10 --shard-size 100 --image-size 16 > /dev/null 2>&1
  $L2C embed-captions big$sig/train --out sig$sig --model minilm --text-field txt --text-field json:long_caption --no-progress > o.txt 2> e.txt &
  P=$!; for i in $(seq 600); do ls sig$sig/*.parquet > /dev/null 2>&1 && break; sleep 0.1; done
  kill -$sig $P; wait $P; rc=$?
  echo "| SIG$sig mid embed | $rc | $(grep -h 'l2c: ' e.txt | head -1) (shards kept: $(ls sig$sig/*.parquet 2>/dev/null | wc -l), temp files: $(ls -a sig$sig | grep -c '^.tmp-')) |"
  $L2C embed-captions big$sig/train --out sig$sig --model minilm --text-field txt --text-field json:long_caption --no-progress > o.txt 2> e.txt
  echo "  rerun: exit $?, $(grep -h 'written / skipped' o.txt | tr -s ' ' | cut -c1-80)"
done
