"""embed-captions reading its sources from and writing its cache to an object store.

The store is a real S3-protocol server on loopback (tests/conftest.py `s3_server`); each job runs the CLI as a
user would, in its own process with its own local Ray and the S3 settings in its environment.
"""

from __future__ import annotations

import os
import subprocess

import fsspec
import pyarrow.parquet as pq
import pytest

from l2c.cache import Manifest, TextCache
from l2c.pipeline.embed_job import EmbedConfig, run_embed
from l2c.storage import Store
from tests.pipeline.conftest import caption_shards, kill_mid_job, l2c_cli

FIELDS = ["-f", "txt", "-f", "json:long_caption"]


def cli_embed(src: str, out: str, model) -> list[str]:
    return [*l2c_cli(), "embed-captions", src, "--out", out, "--model", str(model), *FIELDS,
            "--no-progress"]  # fmt: skip


def shard_objects(fs, out: str) -> dict[str, str]:
    """Parquet objects under `out` -> ETag (changes when an object is written again)."""
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.info(p)["ETag"] for p in fs.find(out[5:]) if p.endswith(".parquet")}


@pytest.mark.slow
def test_s3_sources_and_cache_survive_a_kill(ray_local, s3_server, s3_bucket, tmp_path, minilm_path):
    shards = caption_shards(tmp_path / "src", n_shards=5, per_shard=150)
    ref = tmp_path / "ref"
    run_embed(EmbedConfig(sources=[str(s) for s in shards], out=str(ref), model=str(minilm_path),
                          text_fields=["txt", "json:long_caption"], progress=False))  # fmt: skip

    fs = fsspec.filesystem("s3")
    for p in shards:
        fs.put_file(str(p), f"{s3_bucket[5:]}/src/{p.name}")
    src, out = f"{s3_bucket}/src/shard-{{000..004}}.tar", f"{s3_bucket}/cache"
    env = {**os.environ, **s3_server, "RAY_ADDRESS": "", "COLUMNS": "200"}
    store = Store(out)

    def shards_done() -> int:
        return len(Manifest.load(store).shards) if store.exists("manifest.json") else 0  # manifest + journal

    kill_mid_job(cli_embed(src, out, minilm_path), env, shards_done, total=5)
    recorded = Manifest.load(store).shards
    assert 1 <= len(recorded) < 5
    before = shard_objects(fs, out)
    # every object that carries a shard's name is whole (a killed upload publishes nothing)
    assert set(recorded) <= {n.removesuffix(".parquet") for n in before}
    for name in before:
        assert pq.read_table(store.path(name), filesystem=store.fs).num_rows == 300
    done = subprocess.run(cli_embed(src, out, minilm_path), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{5 - len(recorded)} / {len(recorded)} / 5" in done.stdout  # written / skipped / total
    after = shard_objects(fs, out)
    assert all(after[f"{n}.parquet"] == before[f"{n}.parquet"] for n in recorded)  # finished shards not rewritten

    cache = TextCache(out)
    assert cache.validate() == [] and len(cache) == 5 * 300
    a = TextCache(ref).manifest.to_dict()["shards"]
    b = cache.manifest.to_dict()["shards"]
    assert {k: (v["rows"], v["sha256"]) for k, v in a.items()} == {k: (v["rows"], v["sha256"]) for k, v in b.items()}
    assert {v["source"] for v in b.values()} == {f"{s3_bucket}/src/{p.name}" for p in shards}
    assert store.read_text("rejected.jsonl") == ""
    assert sorted(fs.find(out[5:])) == sorted(
        [f"{out[5:]}/{n}" for n in ("manifest.json", "rejected.jsonl", "keys_checked.json")]
        + [f"{out[5:]}/shard-{i:03d}.parquet" for i in range(5)]
        + [f"{out[5:]}/rejected/shard-{i:03d}.jsonl" for i in range(5)]
    )  # nothing else: no temp objects
