"""Cache locations: paths, file:// URLs and object stores (a real S3-protocol server on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2c.cache import CacheError, TextCache
from l2c.cli import main
from l2c.eval.cra import cra_from_cache
from l2c.storage import StorageError, Store, is_url, normalize
from tests.eval.conftest import write_cache


def test_locations_are_normalized(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Store("rel/cache").url == str(tmp_path / "rel" / "cache") and Store("rel/cache").local
    assert Store(f"file://{tmp_path}/c").url == str(tmp_path / "c")
    assert normalize(Path("s3://bucket/a/b")) == "s3://bucket/a/b"  # a URL that went through a typer Path
    assert Store("gs://bucket/prefix/").url == "gs://bucket/prefix" and not Store("gs://b/p").local
    assert [is_url(s) for s in ("s3://b", "C:/data", "runs/a:b", "file:///x", "cache", "pipe:curl -s http://h/a.tar")] == [
        True, False, False, False, False, False]  # fmt: skip
    assert normalize("pipe:curl -s http://h/a.tar") == "pipe:curl -s http://h/a.tar"


def test_unknown_protocol_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="nosuchproto"):
        _ = Store("nosuchproto://bucket/cache").fs
    with pytest.raises(CacheError, match="nosuchproto"):
        TextCache("nosuchproto://bucket/cache")
    with pytest.raises(CacheError, match="no manifest.json"):
        TextCache(tmp_path)


def _failing_writer(tmp: Path) -> None:
    tmp.write_bytes(b"PAR1 half a file")
    raise OSError("disk full")


def test_local_write_is_atomic(tmp_path):
    store = Store(tmp_path / "c")
    store.makedirs()
    digest = store.write_file("a.bin", lambda p: p.write_bytes(b"whole"))
    assert store.read_bytes("a.bin") == b"whole" and store.sha256("a.bin") == digest
    with pytest.raises(OSError, match="disk full"):
        store.write_file("b.bin", _failing_writer)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.bin"]  # no b.bin, no temp file


def test_object_store_round_trip(s3_bucket):
    store = Store(f"{s3_bucket}/caches/one")
    table = pa.table({"x": np.arange(1000)})
    digest = store.write_file("s.parquet", lambda p: pq.write_table(table, p))
    store.write_text("rejected/s.jsonl", '{"reason": "empty"}\n')
    store.write_text("manifest.json", "{}")
    assert store.list("", ".parquet") == ["s.parquet"] and store.list("rejected", ".jsonl") == ["s.jsonl"]
    assert store.sha256("s.parquet") == digest
    assert pq.read_table(store.path("s.parquet"), filesystem=store.fs).equals(table)

    with pytest.raises(OSError, match="disk full"):
        store.write_file("t.parquet", _failing_writer)
    assert not store.exists("t.parquet")  # a failed write publishes nothing
    store.remove("s.parquet")
    store.remove("never-written")
    assert store.list("", ".parquet") == [] and store.list("missing-dir") == []
    assert Store(f"{s3_bucket}/caches/one").read_text("manifest.json") == "{}"  # a second handle sees it


def test_cache_readers_on_object_store_equal_local(s3_bucket, tmp_path, capsys):
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in range(60) for _ in range(2)]
    fields = ["a", "b"] * 60
    vecs = rng.standard_normal((120, 8)).astype(np.float32)
    vecs[1::2] = vecs[0::2] + 0.3 * rng.standard_normal((60, 8)).astype(np.float32)
    local = write_cache(tmp_path / "cache", keys, fields, vecs, shard_rows=50)
    remote = write_cache(f"{s3_bucket}/cache", keys, fields, vecs, shard_rows=50)

    a, b = TextCache(local), TextCache(remote)
    assert b.dir == f"{s3_bucket}/cache" and b.shard_names == a.shard_names == ["shard-00000", "shard-00001", "shard-00002"]
    assert b.manifest.to_dict()["shards"] == a.manifest.to_dict()["shards"]  # same bytes: same sha256
    ka, fa, va = a.load()
    kb, fb, vb = b.load()
    assert (ka, fa) == (kb, fb) and np.array_equal(va, vb)
    assert b.validate() == []
    ra, rb = cra_from_cache(local), cra_from_cache(remote)
    assert ra["cra_top1"] == rb["cra_top1"] and ra["n"] == rb["n"] == 60

    assert main(["cache-info", remote, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["valid"] and info["rows"] == 120 and info["shards"] == 3
    # a damaged object is caught by the manifest's sha256
    b.store.write_file("shard-00001.parquet", lambda p: pq.write_table(b.read_shard("shard-00001").slice(0, 3), p))
    assert main(["cache-info", remote]) == 1
    assert any("shard-00001" in p for p in TextCache(remote).validate())
