"""Exact top-k retrieval: faiss against numpy (batched matmul + argpartition), time and peak memory.

    python benchmarks/bench_eval.py                                   # 10k, 100k, 1M galleries, 1,000 queries
    python benchmarks/bench_eval.py --sizes 10000,100000 --queries 5000

Galleries and queries are random unit vectors (768-d by default). Both backends run through
`l2c.eval.search.topk`, the code `eval-retrieval` and `eval-cra` use; the numpy backend scores queries in
blocks of at most 256 MB (batch x gallery float32), so neither ever holds a queries x gallery matrix;
`numpy-full` is the naive single matmul + argpartition, for comparison (only where it fits).
Peak memory is the process RSS above what it was before the search (sampled every 2 ms), so it covers
faiss's native allocations as well as numpy's; the gallery itself is not counted (both share it).
Writes a table to the terminal and `OUT/bench_eval.json`.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from l2c import atomic
from l2c.eval import search


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def random_unit(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """n random unit vectors, made in float32 chunks (a 1M x 768 gallery is 3 GB, never 6 GB of float64)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def run_one(backend: str, queries: np.ndarray, gallery: np.ndarray, k: int, repeats: int):
    times = []
    peak = 0.0
    for _ in range(repeats):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if backend == "numpy-full":  # one queries x gallery matmul, one argpartition: the naive way
                scores, idx = search._numpy_topk(queries, gallery, k)
            else:
                scores, idx = search.topk(queries, gallery, k, backend=backend)
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.delta_mb)
    return min(times), peak, scores, idx


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="Gallery sizes, comma-separated.")
    ap.add_argument("--queries", type=int, default=1000, help="Queries per gallery.")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="Runs per cell; the fastest is reported.")
    ap.add_argument(
        "--backends",
        default="faiss,numpy,numpy-full",
        help="faiss, numpy (batched, as eval uses it), numpy-full (one matmul; skipped when its "
        "score matrix would pass --full-limit-gb)",
    )
    ap.add_argument("--full-limit-gb", type=float, default=1.0)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)

    import faiss

    console = Console()
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    queries = random_unit(args.queries, args.dim, seed=1)
    rows = []
    for n in sizes:
        console.print(f"gallery {n:,} x {args.dim} ({n * args.dim * 4 / 2**30:.2f} GiB float32) …")
        gallery = random_unit(n, args.dim, seed=2)
        ref = None
        for backend in backends:
            if backend == "numpy-full" and args.queries * n * 4 / 2**30 > args.full_limit_gb:
                console.print(
                    f"  numpy-full: skipped, its score matrix alone would be {args.queries * n * 4 / 2**30:.1f} GiB"
                )
                continue
            seconds, peak_mb, scores, idx = run_one(backend, queries, gallery, args.k, args.repeats)
            agree = None if ref is None else float(np.mean(idx == ref))
            ref = idx if ref is None else ref
            rows.append({
                "backend": backend,
                "gallery": n,
                "queries": args.queries,
                "dim": args.dim,
                "k": args.k,
                "seconds": round(seconds, 4),
                "queries_per_s": round(args.queries / seconds, 1),
                "gflops": round(2 * args.queries * n * args.dim / seconds / 1e9, 1),
                "peak_mb_over_gallery": round(peak_mb, 1),
                "agree_with_first": agree,
            })  # fmt: skip
            console.print(f"  {backend}: {seconds:.3f} s, +{peak_mb:.0f} MB")
        del gallery

    table = Table(title=f"Exact top-{args.k} inner-product search, {args.queries:,} queries, {args.dim}-d")
    for col in ("gallery", "backend", "time (s)", "queries/s", "GFLOP/s", "peak RSS (MB)", "top-k = first"):
        table.add_column(col, justify="right")
    for r in rows:
        agree = "—" if r["agree_with_first"] is None else f"{100 * r['agree_with_first']:.2f}%"
        table.add_row(f"{r['gallery']:,}", r["backend"], f"{r['seconds']:.3f}", f"{r['queries_per_s']:,.0f}",
                      f"{r['gflops']:.1f}", f"{r['peak_mb_over_gallery']:.0f}", agree)  # fmt: skip
    console.print(table)
    result = {
        "benchmark": "eval top-k search",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
            "numpy": np.__version__,
        },
        "results": rows,
    }
    path = Path(args.out) / "bench_eval.json"
    atomic.write_json(path, result)
    console.print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
