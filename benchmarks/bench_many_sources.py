"""Many sources: does the embed job's cost per shard stay flat as the shards add up?

2,000 JSONL sources of 500 real captions each (COCO val2017 and Flickr8k train captions from ../shared/data,
cycled; generated under OUT/many/src), a tiny random BERT (saved with save_pretrained, the packaged MiniLM's
tokenizer) as the model, through `run_embed` in this process, which is the job's driver (`--runner`: auto, which here runs the stages in
this process too, or ray: a local Ray Data job). A sampler thread
reads, every 0.2 s, how many shards the manifest journal holds and the driver's resident memory; the table
gives wall time per shard and driver RSS by hundred shards, first hundred to last. JSON to OUT/.

    python benchmarks/bench_many_sources.py [--sources 2000] [--per-source 500] [--runner auto|ray] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

from l2c.memory import rss_mb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def make_sources(src: Path, n: int, per: int) -> list[Path]:
    """`n` files part-NNNNN.jsonl of `per` records {"image_id", "caption"}; kept when already there."""
    paths = [src / f"part-{s:05d}.jsonl" for s in range(n)]
    stamp = src / "made.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"n": n, "per": per}:
        return paths
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    captions = [c for name in ("coco_val2017_captions.jsonl", "flickr8k_train_captions.jsonl")
                for ln in (DATA / name).read_text().splitlines() for c in json.loads(ln)["captions"]]  # fmt: skip
    j = 0
    for s, p in enumerate(paths):
        lines = []
        for i in range(per):
            lines.append(json.dumps({"image_id": f"s{s:05d}-{i:03d}", "caption": captions[j % len(captions)]}))
            j += 1
        p.write_text("\n".join(lines) + "\n")
    stamp.write_text(json.dumps({"n": n, "per": per}))
    return paths


def tiny_bert(out: Path) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved with save_pretrained."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from l2c.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


class Sampler(threading.Thread):
    """(seconds, shards in the journal, driver RSS MB) every `every` seconds until stopped."""

    def __init__(self, journal: Path, every: float = 0.2):
        super().__init__(daemon=True)
        self.journal, self.every, self.samples, self.halt = journal, every, [], threading.Event()
        self.t0 = time.perf_counter()

    def run(self):
        while not self.halt.is_set():
            try:
                n = sum(1 for e in os.scandir(self.journal) if e.name.endswith(".json"))
            except FileNotFoundError:
                n = 0
            self.samples.append((time.perf_counter() - self.t0, n, rss_mb()))
            self.halt.wait(self.every)


def per_hundred(samples: list[tuple[float, int, float]], n: int, step: int = 100) -> list[dict]:
    """For shards (k, k+step]: seconds per shard and the driver's RSS when the last of them finished."""
    rows, prev_t = [], None
    for hi in range(step, n + 1, step):
        at = next((s for s in samples if s[1] >= hi), None)
        if at is None:
            break
        start = prev_t if prev_t is not None else next((s[0] for s in samples if s[1] >= 1), at[0])
        # the first bucket runs from the first finished shard (Ray start and model load are not per-shard cost)
        count = step if prev_t is not None else step - 1
        rows.append({"shards": f"{hi - step + 1}-{hi}", "ms_per_shard": 1000 * (at[0] - start) / max(count, 1),
                     "driver_rss_mb": at[2]})  # fmt: skip
        prev_t = at[0]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=2000)
    ap.add_argument("--per-source", type=int, default=500)
    ap.add_argument("--runner", choices=["auto", "local", "ray"], default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.out / "many"
    srcs = make_sources(work / "src", args.sources, args.per_source)
    model = tiny_bert(work / "tiny-bert")

    from l2c.cache import JOURNAL_DIR, TextCache
    from l2c.pipeline.embed_job import EmbedConfig, run_embed

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    sampler = Sampler(cache / JOURNAL_DIR)
    rss0 = rss_mb()
    sampler.start()
    t0 = time.perf_counter()
    s = run_embed(EmbedConfig(sources=[str(p) for p in srcs], out=str(cache), model=str(model), key_field="image_id",
                              text_fields=["caption"], dtype="float32", progress=False, runner=args.runner))  # fmt: skip
    total = time.perf_counter() - t0
    sampler.halt.set()
    sampler.join()
    assert s["shards_written"] == args.sources and len(TextCache(cache)) == args.sources * args.per_source

    rows = per_hundred(sampler.samples, args.sources)
    first, last = rows[0], rows[-1]
    res = {"runner": s["runner"], "sources": args.sources, "per_source": args.per_source, "captions": s["rows"], "seconds": total,
           "captions_per_s": s["rows"] / total, "driver_rss_mb_before": rss0, "per_hundred": rows,
           "last_over_first_ms_per_shard": last["ms_per_shard"] / first["ms_per_shard"],
           "rss_growth_mb_first_to_last": last["driver_rss_mb"] - first["driver_rss_mb"]}  # fmt: skip

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_many_sources: {args.sources:,} sources × {args.per_source} captions, tiny BERT, "
                    f"runner {s['runner']}")
    for col in ("shards", "ms per shard", "driver RSS MB"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["shards"], f"{r['ms_per_shard']:.0f}", f"{r['driver_rss_mb']:.0f}")
    Console().print(t)
    print(f"{total:.0f} s in all, {res['captions_per_s']:,.0f} captions/s; last/first hundred time per shard "
          f"{res['last_over_first_ms_per_shard']:.2f}, RSS growth {res['rss_growth_mb_first_to_last']:+.0f} MB")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_many_sources_{s['runner']}.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
