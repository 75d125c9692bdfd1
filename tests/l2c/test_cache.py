import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from l2c.cache import CacheError, Manifest, ShardEntry, TextCache, arrow_schema, build_table, write_shard_file


def make_cache(d, store_dtype="float16", rows=5, dim=8):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, dim)).astype(np.float32)
    keys = [f"k{i // 2}" for i in range(rows)]
    fields = ["txt" if i % 2 == 0 else "json:long_caption" for i in range(rows)]
    table = build_table(keys, fields, emb, np.arange(rows) + 3, np.zeros(rows, bool), store_dtype)
    n, digest = write_shard_file(d, "s0.parquet", table)
    m = Manifest(settings={"dim": dim, "store_dtype": store_dtype, "fields": ["txt", "json:long_caption"],
                           "model_fingerprint": "abc"},
                 shards={"s0": ShardEntry(file="s0.parquet", source="/x/s0.tar", rows=n, sha256=digest)})  # fmt: skip
    m.save(d)
    return emb, keys, fields


@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_roundtrip_schema_and_values(tmp_path, store_dtype):
    emb, keys, fields = make_cache(tmp_path, store_dtype)
    assert pq.read_schema(tmp_path / "s0.parquet").equals(arrow_schema(8, store_dtype), check_metadata=False)
    c = TextCache(tmp_path)
    k, f, v = c.load()
    assert (k, f) == (keys, fields) and len(c) == 5 and c.dim == 8
    np.testing.assert_allclose(v, emb, rtol=1e-3 if store_dtype == "float16" else 0, atol=1e-3 if store_dtype == "float16" else 0)
    k2, f2, v2 = c.load(fields=["txt"])
    assert f2 == ["txt"] * 3 and np.array_equal(v2, v[[0, 2, 4]])
    assert c.shard_for_source("/x/s0.tar") == "s0" and c.validate() == []


def test_validate_catches_a_changed_file_and_missing_file(tmp_path):
    make_cache(tmp_path)
    t = pq.read_table(tmp_path / "s0.parquet")
    pq.write_table(t.slice(1), tmp_path / "s0.parquet")
    assert "sha256" in TextCache(tmp_path).validate()[0]
    (tmp_path / "s0.parquet").unlink()
    assert "missing" in TextCache(tmp_path).validate()[0]


def test_manifest_refuses_foreign_or_newer_formats(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json"):
        TextCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CacheError, match="not an l2c text cache"):
        TextCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "l2c-text-cache", "format_version": 99, "settings": {}}))
    with pytest.raises(CacheError, match="newer"):
        TextCache(tmp_path)


def test_rows_must_agree():
    with pytest.raises(CacheError, match="rows disagree"):
        build_table(["a"], ["txt", "txt"], np.zeros((1, 4)), [1], [False])


def test_unknown_field_is_an_error_listing_the_known_ones(tmp_path):
    make_cache(tmp_path)
    with pytest.raises(CacheError, match=r"'caption' is not in text cache .* holds txt, json:long_caption"):
        TextCache(tmp_path).load(fields=["caption"])


def test_star_spec_selects_every_element_under_one_name(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((6, 4)).astype(np.float32)
    keys = ["a", "a", "a", "b", "b", "b"]
    fields = ["json:captions[0]", "json:captions[1]", "txt", "json:captions[0]", "json:captions[1]", "txt"]
    n, digest = write_shard_file(tmp_path, "s0.parquet", build_table(keys, fields, emb, [3] * 6, [False] * 6))
    Manifest(settings={"dim": 4, "store_dtype": "float16", "fields": ["json:captions[*]", "txt"]},
             shards={"s0": ShardEntry(file="s0.parquet", source="s0.tar", rows=n, sha256=digest)}).save(tmp_path)  # fmt: skip
    c = TextCache(tmp_path)
    k, f, _ = c.load(fields=["json:captions[*]"])
    assert k == ["a", "a", "b", "b"] and f == ["json:captions[0]", "json:captions[1]"] * 2
    assert c.load(fields=["json:captions[1]"])[1] == ["json:captions[1]"] * 2  # one element by its row name


def test_dim_disagreeing_with_vectors_is_refused_with_both_numbers(tmp_path):
    make_cache(tmp_path, dim=8)
    m = Manifest.load(tmp_path)
    m.settings["dim"] = 16
    m.save(tmp_path)
    c = TextCache(tmp_path)
    with pytest.raises(CacheError, match="shard s0 holds 8-dim vectors but the manifest says dim=16"):
        c.check_dims()
    with pytest.raises(CacheError, match="shard s0 holds"):
        c.check_dims(part=(0, 2))  # rank 0 of 2 reads s0's footer
    c.check_dims(part=(1, 2))  # rank 1 of 2 reads none here: the ranks share the footer reads
    assert c.validate() == ["s0: 8-dim vectors, manifest says dim=16"]  # one line, no Arrow schema dump
    with pytest.raises(CacheError, match="holds 16-dim vectors, 32 expected"):
        c.check_dims(32)


def test_journal_records_shards_flat_and_save_folds_it_in(tmp_path):
    make_cache(tmp_path)
    m = Manifest.load(tmp_path)
    manifest_bytes = (tmp_path / "manifest.json").read_bytes()
    for i in range(1, 4):
        n, digest = write_shard_file(tmp_path, f"s{i}.parquet", pq.read_table(tmp_path / "s0.parquet"))
        m.record(tmp_path, f"s{i}", ShardEntry(file=f"s{i}.parquet", source=f"/x/s{i}.tar", rows=n, sha256=digest))
    assert (tmp_path / "manifest.json").read_bytes() == manifest_bytes  # not rewritten per shard
    (tmp_path / "manifest.d" / "partial.json").write_text('{"s9": {"file": "s9.parq')  # a foreign, cut file
    c = TextCache(tmp_path)  # what a reader sees after kill -9: manifest + journal
    assert c.shard_names == ["s0", "s1", "s2", "s3"] and len(c) == 20 and c.validate() == []
    m.save(tmp_path)
    assert not list((tmp_path / "manifest.d").glob("*.json"))
    assert json.loads((tmp_path / "manifest.json").read_text())["totals"]["shards"] == 4


def test_a_process_merges_the_journal_once_until_it_changes(tmp_path):
    """`Manifest.load` keeps what it read while manifest.json and the journal's listing are unchanged: a journal
    file changed in place (same name, size and time) is not read again; a new journal file, a rewritten
    manifest.json and the folded journal are. A caller changing its copy changes no later load."""
    import os

    make_cache(tmp_path)
    m = Manifest.load(tmp_path)
    n, digest = write_shard_file(tmp_path, "s1.parquet", pq.read_table(tmp_path / "s0.parquet"))
    m.record(tmp_path, "s1", ShardEntry(file="s1.parquet", source="/x/s1.tar", rows=n, sha256=digest))
    assert sorted(Manifest.load(tmp_path).shards) == ["s0", "s1"]
    journal = tmp_path / "manifest.d" / "s1.json"
    st = journal.stat()
    journal.write_text(journal.read_text().replace('"rows": 5', '"rows": 7'))  # same size
    os.utime(journal, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert Manifest.load(tmp_path).shards["s1"].rows == 5  # merged once: not read again
    m.record(tmp_path, "s2", ShardEntry(file="s1.parquet", source="/x/s2.tar", rows=n, sha256=digest))
    again = Manifest.load(tmp_path)  # the listing changed: read again
    assert sorted(again.shards) == ["s0", "s1", "s2"] and again.shards["s1"].rows == 7
    again.settings["dim"] = 99
    again.shards.pop("s0")
    assert Manifest.load(tmp_path).settings["dim"] == 8 and "s0" in Manifest.load(tmp_path).shards
    m.settings["fields"] = ["txt"]
    m.save(tmp_path)  # folds the journal into a new manifest.json
    folded = Manifest.load(tmp_path)
    assert folded.settings["fields"] == ["txt"] and sorted(folded.shards) == ["s0", "s1", "s2"]
    assert not list((tmp_path / "manifest.d").glob("*.json"))


def test_find_keys_reads_the_rows_of_some_keys_a_row_group_at_a_time(tmp_path, monkeypatch):
    """The rows of the keys asked for (and fields), in cache order, from shards of several row groups; other
    keys' rows are counted, and their row groups' vectors never read."""
    import l2c.cache as cache_mod

    monkeypatch.setattr(cache_mod, "ROW_GROUP_BYTES", 8 * 2 * 8)  # 8 rows of 8-d float16 a group (at least 1024)
    rng = np.random.default_rng(3)
    keys = [f"k{i:04d}" for i in range(3000) for _ in range(2)]
    fields = ["txt", "json:long_caption"] * 3000
    emb = rng.standard_normal((6000, 8)).astype(np.float32)
    shards = {}
    for s in range(3):
        sl = slice(s * 2000, (s + 1) * 2000)
        n, digest = write_shard_file(tmp_path, f"s{s}.parquet", build_table(keys[sl], fields[sl], emb[sl], [3] * 2000,
                                                                          [False] * 2000))  # fmt: skip
        shards[f"s{s}"] = ShardEntry(file=f"s{s}.parquet", source=f"s{s}.tar", rows=n, sha256=digest)
    Manifest(settings={"dim": 8, "store_dtype": "float16", "fields": ["txt", "json:long_caption"]},
             shards=shards).save(tmp_path)  # fmt: skip
    c = TextCache(tmp_path)
    assert c.open_shard("s0").num_row_groups == 2  # 1,024 rows a group
    want = ["k2999", "k0001", "k1500", "not-there"]
    found = c.find_keys(want, ["json:long_caption"])
    rows = [i for i, (k, f) in enumerate(zip(keys, fields, strict=True)) if k in want and f == "json:long_caption"]
    assert [want[i] for i in found.key_index] == [keys[r] for r in rows] == ["k0001", "k1500", "k2999"]
    assert found.fields == ["json:long_caption"] and (found.field_index == 0).all()
    assert found.other_rows == 3000 - 3
    assert [(s, g) for s, g, _ in found.pieces] == [("s0", 0), ("s1", 0), ("s2", 1)]  # only groups with a hit
    got = np.concatenate(list(c.read_vectors(found, np.float32)))
    np.testing.assert_array_equal(got, emb[rows].astype(np.float16).astype(np.float32))
    both = c.find_keys(want)
    assert both.fields == ["txt", "json:long_caption"] and len(both) == 6 and both.other_rows == 6000 - 6
    with pytest.raises(CacheError, match="'caption' is not in text cache"):
        c.find_keys(want, ["caption"])
