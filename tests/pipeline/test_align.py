"""align-cache: a cache grouped otherwise than the tars, rewritten as one shard per tar (real tars, real Parquet,
the job in this process and as a real local Ray Data job)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from l2c.cache import Manifest, ShardEntry, TextCache, build_table, write_shard_file
from l2c.data.shards import read_tar
from l2c.meta import TextCacheSettings
from l2c.pipeline.align import AlignConfig, run_align
from l2c.teacher import TeacherSpec
from l2c.trainer.vision.pairing import Pairing, plan_pairing

from .conftest import kill_mid_job, l2c_cli, write_tar

FIELDS = ["txt", "json:long_caption"]


def make_tars(root, n_tars: int, per_tar: int, png: bytes) -> tuple[list[str], list[list[str]]]:
    """Tars of `per_tar` samples (an image and a caption each), keys not in sorted order within a tar."""
    urls, keys = [], []
    for t in range(n_tars):
        ks = [f"img-{(i * 7919 + t * 131) % 100003:06d}-{t}" for i in range(per_tar)]
        write_tar(root / f"part-{t:04d}.tar", [{"__key__": k, "png": png, "txt": f"caption of {k}"} for k in ks])
        urls.append(str(root / f"part-{t:04d}.tar"))
        keys.append(ks)
    return urls, keys


def make_table_cache(directory, keys: list[str], dim: int, n_shards: int, seed: int = 0, fingerprint: str = "f00d",
                     store_dtype: str = "float16"):  # fmt: skip
    """A text cache as caption tables give it: every key's two fields, keys shuffled over `n_shards` shards."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    settings = TextCacheSettings(TeacherSpec(model="test-teacher", model_fingerprint=fingerprint, dim=dim,
                                             store_dtype=store_dtype), tuple(FIELDS), "key", "kept").to_dict()  # fmt: skip
    shards = {}
    for s, part in enumerate(np.array_split(order, n_shards)):
        ks = [keys[i] for i in part for _ in FIELDS]
        fs = [f for _ in part for f in FIELDS]
        vecs = rng.standard_normal((len(ks), dim)).astype(np.float32)
        table = build_table(ks, fs, vecs, rng.integers(3, 40, len(ks)), rng.random(len(ks)) < 0.1, store_dtype)
        rows, sha = write_shard_file(directory, f"captions-{s:03d}.parquet", table)
        shards[f"captions-{s:03d}"] = ShardEntry(f"captions-{s:03d}.parquet", f"captions-{s:03d}.jsonl", rows, sha)
    Manifest(settings=settings, shards=shards).save(directory)
    return directory


@pytest.fixture
def data(tmp_path, png_bytes):
    urls, tar_keys = make_tars(tmp_path / "tars", n_tars=5, per_tar=40, png=png_bytes)
    flat = [k for ks in tar_keys for k in ks]
    missing = set(flat[3::17])  # tar keys without captions: rejected
    extra = [f"no-image-{i}" for i in range(25)]  # captions of no tar: not routed
    cache = make_table_cache(tmp_path / "captions", [k for k in flat if k not in missing] + extra, dim=24, n_shards=3)
    return urls, tar_keys, missing, cache


def join_pairing(cache_dir, urls: list[str], index_dir) -> Pairing:
    """train-vision's join pairing of these tars: every key looked up in the index of the whole cache."""
    return plan_pairing(TextCache(cache_dir), urls, "join", FIELDS, index_dir)


def pairs(pairing: Pairing, url: str) -> list[tuple]:
    """What train-vision's pairing yields for one tar: (status, key, {field: vector}) per sample."""
    out = []
    for item in pairing.pair_shard(url, read_tar(url)):
        if item[0] == "ok":
            out.append(("ok", item[1], {f: np.asarray(v, np.float32) for f, v in item[3].items()}))
        elif item[0] != "end":
            out.append(item)
    return out


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_aligned_cache_pairs_as_join_pairing_does(data, tmp_path, runner, request):
    if runner == "ray":
        request.getfixturevalue("ray_local")
    urls, tar_keys, missing, cache_dir = data
    out = tmp_path / "aligned"
    s = run_align(AlignConfig(str(cache_dir), urls, str(out), partition_mb=0.01, runner=runner, progress=False))
    assert s["runner"] == runner and s["shards_written"] == 5 and s["shards_skipped"] == 0
    assert s["partitions"] > 1  # 1 MB partitions: several write tasks
    assert s["rejected_by_reason_this_run"] == {"no_vector": len(missing)} and s["rejected"] == len(missing)
    assert s["cache_rows_not_routed"] == 25 * len(FIELDS)
    aligned, source = TextCache(out), TextCache(cache_dir)
    assert aligned.validate() == [] and aligned.teacher.identity() == source.teacher.identity()
    assert aligned.meta == source.meta and aligned.settings["aligned"]["tars"] == 5
    assert not (out / ".tmp-align").exists()
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rejected) == sorted(missing) and {r["reason"] for r in rejected} == {"no_vector"}

    names = {url: aligned.shard_for_source(url) for url in urls}
    assert sorted(names.values()) == [f"part-{t:04d}" for t in range(5)]
    join = join_pairing(cache_dir, urls, tmp_path / "index")
    by_shard = Pairing(out, FIELDS, shard_names=names, strict=True)
    for url, keys in zip(urls, tar_keys, strict=True):
        table = aligned.read_shard(names[url])
        assert list(dict.fromkeys(table.column("key").to_pylist())) == [k for k in keys if k not in missing]
        got, want = pairs(by_shard, url), pairs(join, url)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        assert sum(g[0] == "missing_vector" for g in got) == sum(k in missing for k in keys)
        for g, w in zip(got, want, strict=True):
            if g[0] == "ok":
                assert g[2].keys() == w[2].keys() == set(FIELDS)
                for f in FIELDS:
                    np.testing.assert_array_equal(g[2][f], w[2][f])
    # the other columns come along unchanged
    src = {(k, f): (n, t) for _, tb in source.iter_tables() for k, f, n, t in zip(*(tb.column(c).to_pylist()
           for c in ("key", "field", "n_tokens", "truncated")), strict=True)}  # fmt: skip
    for _, tb in aligned.iter_tables():
        for k, f, n, t in zip(*(tb.column(c).to_pylist() for c in ("key", "field", "n_tokens", "truncated")), strict=True):
            assert src[(k, f)] == (n, t)


def test_a_key_twice_in_the_cache_keeps_the_last_row_and_a_damaged_tar_is_partial(data, tmp_path):
    """A (key, field) in two shards of the cache: the last in cache order, as the join index keeps it. A tar cut
    short keeps the samples read before the damage (the shard is partial and a rerun retries it)."""
    urls, tar_keys, missing, cache_dir = data
    key = next(k for k in tar_keys[1] if k not in missing)
    vec = np.full((1, 24), 0.5, np.float32)
    rows, sha = write_shard_file(cache_dir, "zz-late.parquet", build_table([key], ["txt"], vec, [5], [False]))
    m = Manifest.load(cache_dir)
    m.record(cache_dir, "zz-late", ShardEntry("zz-late.parquet", "late.jsonl", rows, sha))
    raw = open(urls[2], "rb").read()
    open(urls[2], "wb").write(raw[: len(raw) // 2])
    out = tmp_path / "aligned"
    s = run_align(AlignConfig(str(cache_dir), urls, str(out), runner="local", progress=False))
    c = TextCache(out)
    t = c.read_shard("part-0001")
    row = [i for i, (k, f) in enumerate(zip(t["key"].to_pylist(), t["field"].to_pylist(), strict=True))
           if (k, f) == (key, "txt")]  # fmt: skip
    assert len(row) == 1 and np.all(t["embedding"][row[0]].values.to_numpy() == np.float16(0.5))
    join = join_pairing(cache_dir, urls, tmp_path / "index")
    np.testing.assert_array_equal(join.lookup(key)["txt"], np.full(24, 0.5, np.float32))
    assert s["shards_partial"] == ["part-0002"] and c.manifest.shards["part-0002"].partial
    kept = list(dict.fromkeys(c.read_shard("part-0002")["key"].to_pylist()))
    assert 0 < len(kept) < 40 and kept == [k for k in tar_keys[2][: len(kept) + 5] if k not in missing][: len(kept)]
    again = run_align(AlignConfig(str(cache_dir), urls, str(out), runner="local", progress=False))
    assert again["shards_skipped"] == 4 and again["shards_written"] == 1  # the partial shard is retried


def test_refuses_an_out_of_another_teacher_and_the_cache_itself(data, tmp_path, refused):
    urls, _, _, cache_dir = data
    out = tmp_path / "aligned"
    run_align(AlignConfig(str(cache_dir), urls[:2], str(out), runner="local", progress=False))
    other = make_table_cache(tmp_path / "other", ["a", "b"], dim=24, n_shards=1, fingerprint="beef")
    refused(["align-cache", "--text-cache", other, "--images", urls[0], "--out", out, "--no-progress"],
            r"already holds a cache made with other settings \(model_fingerprint: cache has 'f00d', this run 'beef'\)")
    wider = make_table_cache(tmp_path / "wider", ["a", "b"], dim=32, n_shards=1)
    refused(["align-cache", "--text-cache", wider, "--images", urls[0], "--out", out, "--no-progress"],
            r"dim: cache has 24, this run 32")  # fmt: skip
    refused(["align-cache", "--text-cache", cache_dir, "--images", urls[0], "--out", cache_dir, "--no-progress"],
            "is the text cache itself")
    assert sorted(TextCache(out).shard_names) == ["part-0000", "part-0001"]  # left as it was
    # the same teacher: a rerun with more tars adds their shards only
    s = run_align(AlignConfig(str(cache_dir), urls, str(out), runner="local", progress=False))
    assert s["shards_skipped"] == 2 and s["shards_written"] == 3


def test_config_file_overrides_and_flags_reach_the_job(data, tmp_path, refused):
    """align-cache takes its settings as every command does (l2c.config.load_config): the --config file, then
    key=value overrides, then the flags typed on the command line."""
    import yaml

    from l2c.cli import main

    urls, _, _, cache_dir = data
    cfg = tmp_path / "align.yaml"
    cfg.write_text(yaml.safe_dump({"text_cache": str(cache_dir), "images": urls[:3], "out": str(tmp_path / "from-file"),
                                   "runner": "local", "progress": False}))  # fmt: skip
    assert main(["align-cache", "--config", str(cfg), "partition_mb=0.01", "--out", str(tmp_path / "flag")]) == 0
    assert not (tmp_path / "from-file").exists()  # the flag won over the file
    c = TextCache(tmp_path / "flag")
    assert c.shard_names == ["part-0000", "part-0001", "part-0002"]
    refused(["align-cache", "--images", urls[0], "--out", str(tmp_path / "x"), "--no-progress"],
            "align-cache needs --text-cache")
    refused(["align-cache", "--config", str(cfg), "partition_mb=0"], "--partition-mb must be positive")


@pytest.mark.slow
def test_kill_9_mid_job_then_rerun_equals_uninterrupted(tmp_path, png_bytes):
    urls, tar_keys = make_tars(tmp_path / "tars", n_tars=40, per_tar=300, png=png_bytes)
    cache_dir = make_table_cache(tmp_path / "captions", [k for ks in tar_keys for k in ks], dim=768, n_shards=4)
    ref = tmp_path / "ref"
    run_align(AlignConfig(str(cache_dir), urls, str(ref), partition_mb=4, runner="local", progress=False))

    out = tmp_path / "crashed"
    cmd = [*l2c_cli(), "align-cache", "--text-cache", str(cache_dir), "--images", str(tmp_path / "tars"),
           "--out", str(out), "--partition-mb", "4", "--no-progress"]  # fmt: skip
    m = out / "manifest.json"
    n_done = kill_mid_job(cmd, {**os.environ, "RAY_ADDRESS": ""},
                          lambda: len(Manifest.load(out).shards) if m.exists() else 0, total=40)  # fmt: skip
    assert 1 <= n_done < 40 and (out / ".tmp-align").exists()
    assert len(list((out / "manifest.d").glob("*.json"))) == n_done  # the journal of the killed job
    s = run_align(AlignConfig(str(cache_dir), urls, str(out), partition_mb=4, runner="local", progress=False))
    assert s["shards_skipped"] == n_done and s["shards_written"] == 40 - n_done
    assert not list((out / "manifest.d").glob("*.json"))  # folded into manifest.json at the end
    assert TextCache(ref).manifest.to_dict()["shards"] == TextCache(out).manifest.to_dict()["shards"]  # same sha256
    assert not list(out.glob(".tmp-*")) and TextCache(out).validate() == []
