"""`l2c mine-negatives` with the bounded-memory index (`--index ivfpq`) on a synthetic cache, and the figures that
scale it to the users' size (75M caption vectors of 4096 dims in 15,000 shards: 37.5M keys of two fields).

A cache of `--keys` keys (one field, `--dim` dims, `--shards` shards; clustered random vectors stored as float16)
is mined in a subprocess: its wall and CPU time and peak resident memory come from the OS. Then the kept index
is searched on one thread with one list probed and with every list probed (CPU time of this process), which
gives the fixed cost of a query and the product-code scan per code (the part that grows with the cache); a query at the users' size scans nprobe/nlist of 37.5M codes (16 of 16,384 lists: ~36,600).

    python benchmarks/bench_mine.py [--keys 50000] [--dim 1024] [--shards 8] [--out bench-out/mine]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
USERS = {"keys": 37_500_000, "dim": 4096, "shards": 15_000, "nlist": 16_384, "nprobe": 16, "pq": 32}


def write_cache(out: Path, keys: int, dim: int, shards: int, seed: int = 0) -> None:
    from l2c.cache import Manifest, ShardEntry, build_table, write_shard_file

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(8, keys // 100), dim)).astype(np.float32)
    out.mkdir(parents=True)
    entries = {}
    for s in range(shards):
        n = keys // shards
        x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
        names = [f"k{s:04d}_{i:07d}" for i in range(n)]
        table = build_table(names, ["txt"] * n, x, [8] * n, [False] * n)
        rows, sha = write_shard_file(out, f"shard-{s:06d}.parquet", table)
        entries[f"shard-{s:06d}"] = ShardEntry(file=f"shard-{s:06d}.parquet", source=f"synthetic-{s}", rows=rows,
                                               sha256=sha)  # fmt: skip
    settings = {"model": "synthetic", "dim": dim, "fields": ["txt"], "model_fingerprint": "synthetic",
                "store_dtype": "float16"}  # fmt: skip
    Manifest(settings=settings, shards=entries).save(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "mine")
    ap.add_argument("--search-only", action="store_true", help="time the search of the index a last run kept")
    a = ap.parse_args(argv)
    cache = a.out / "cache"
    mined = {}
    if not a.search_only:
        shutil.rmtree(a.out, ignore_errors=True)
        write_cache(cache, a.keys, a.dim, a.shards)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "l2c.cli", "mine-negatives", "--text-cache", str(cache), "--index",
                        "ivfpq", "--no-progress"], check=True, cwd=ROOT)  # fmt: skip
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        mined = {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
                 "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)}
        (a.out / "mined.json").write_text(json.dumps(mined))
    mined = json.loads((a.out / "mined.json").read_text()) if a.search_only else mined
    meta = json.loads((cache / "negatives" / "negatives.json").read_text())

    import faiss

    index = faiss.read_index(str(cache / "negatives" / "index.faiss"))
    ivf = faiss.extract_index_ivf(index)
    from l2c.cache import TextCache, embedding_matrix

    q = embedding_matrix(TextCache(cache).read_shard("shard-000000"), np.float32)[:500]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    faiss.omp_set_num_threads(1)
    timing = {}
    for nprobe in (1, ivf.nlist):  # one list (the fixed cost: PCA, coarse search) and every list (+ every code)
        ivf.nprobe = nprobe
        t = time.process_time()  # CPU time of this process: other load on the machine does not count
        index.search(q, 17)
        timing[nprobe] = (time.process_time() - t) / len(q)
    per_code = (timing[ivf.nlist] - timing[1]) / index.ntotal
    codes = USERS["keys"] * USERS["nprobe"] / USERS["nlist"]
    per_query = timing[1] * USERS["dim"] / index.d + per_code * codes  # the PCA grows with the dim
    result = {
        "keys": meta["keys"], "dim": index.d, "shards": len(meta["cache"]["shards"]), **mined, "nlist": ivf.nlist, "build_s": meta["build_s"],
        "search_s_per_key": meta["search_s_per_key"], "one_core_s_per_query_one_list": timing[1],
        "one_core_s_per_code": per_code,
        "users": {**USERS, "codes_per_query": round(codes), "one_core_s_per_query": per_query,
                  "core_hours_search": per_query * USERS["keys"] / 3600},
    }  # fmt: skip
    (a.out / "mine.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
