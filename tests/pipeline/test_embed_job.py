"""The embed-captions job end to end on a real local Ray, real tars and real Parquet."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from l2c.cache import CacheError, Manifest, TextCache, embedding_matrix
from l2c.cli import main
from l2c.pipeline.embed_job import EmbedConfig, run_embed
from l2c.pipeline.encoder import TextEncoder
from tests.pipeline.conftest import caption_shards, kill_mid_job, l2c_cli, write_tar

FIELDS = ["txt", "json:long_caption"]


def embed(sources, out, **kw):
    kw.setdefault("text_fields", FIELDS)
    kw.setdefault("progress", False)
    return run_embed(EmbedConfig(sources=[str(s) for s in sources], out=str(out), **kw))


def expected_rows(tar):
    import webdataset as wds

    rows = []
    for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
        rows.append((s["__key__"], "txt", s["txt"].decode()))
        rows.append((s["__key__"], "json:long_caption", json.loads(s["json"])["long_caption"]))
    return rows


@pytest.mark.parametrize("model", ["minilm", "tiny_llama"])
def test_cache_equals_direct_forward_and_keeps_shard_order(ray_local, tmp_path, request, model):
    path = request.getfixturevalue("minilm_path" if model == "minilm" else model)
    shards = caption_shards(tmp_path / "src", n_shards=2, per_shard=6)
    summary = embed(shards, tmp_path / "cache", model=str(path), store_dtype="float32", dtype="float32")
    assert summary["shards_written"] == 2 and summary["rejected"] == 0

    cache = TextCache(tmp_path / "cache")
    assert cache.validate() == []
    enc = TextEncoder.load(path, dtype="float32")
    for tar in shards:
        table = cache.read_shard(tar.stem)
        want = expected_rows(tar)
        assert list(zip(table["key"].to_pylist(), table["field"].to_pylist(), strict=True)) == [w[:2] for w in want]
        ref = enc.encode([w[2] for w in want])
        got = embedding_matrix(table)
        assert np.all((got * ref).sum(1) >= 0.9999)
        assert table["n_tokens"].to_pylist() == [len(x) for x in enc.captions([w[2] for w in want]).ids]
    m = cache.settings
    assert m["dim"] == enc.dim and m["bidirectional"] is True and m["is_decoder"] == (model == "tiny_llama")


def test_planted_bad_inputs_are_counted_exactly(ray_local, tmp_path, minilm_path):
    good = caption_shards(tmp_path / "src", n_shards=1, per_shard=4)[0]
    bad = write_tar(tmp_path / "src" / "bad.tar", [
        {"__key__": "b0", "txt": "fine caption", "json": {"long_caption": "fine long caption"}},
        {"__key__": "b1", "txt": "", "json": {"long_caption": 7}},
        {"__key__": "b2", "txt": b"\xc3\x28", "json": {"other": "x"}},
        {"__key__": "b0", "txt": "duplicate", "json": {"long_caption": "duplicate"}},
    ])  # fmt: skip
    broken = tmp_path / "src" / "broken.tar"
    broken.write_bytes(b"\x00not a tar at all" * 100)
    s = embed([good, bad, broken], tmp_path / "cache", model=str(minilm_path))
    assert s["shards_written"] == 2 and s["shards_failed"] == ["broken"]
    assert s["rejected_by_reason_this_run"] == {
        "empty": 1, "not_string": 1, "invalid_utf8": 1, "missing_field": 1, "duplicate_key": 1, "unreadable_shard": 1,
    }  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "cache" / "rejected.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {r["shard"] for r in lines} == {"bad", "broken"}
    cache = TextCache(tmp_path / "cache")
    assert cache.read_shard("bad")["key"].to_pylist() == ["b0", "b0"]
    assert len(cache) == 4 * 2 + 2  # nothing else lost, nothing added
    with pytest.raises(CacheError, match="--strict"):
        embed([bad], tmp_path / "strict", model=str(minilm_path), strict=True)


def test_rerun_skips_done_shards_and_refuses_other_settings(ray_local, tmp_path, minilm_path, tiny_llama):
    shards = caption_shards(tmp_path / "src", n_shards=3, per_shard=3)
    out = tmp_path / "cache"
    embed(shards[:2], out, model=str(minilm_path))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    s = embed(shards, out, model=str(minilm_path))
    assert s["shards_skipped"] == 2 and s["shards_written"] == 1
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    with pytest.raises(CacheError, match="model_fingerprint"):
        embed(shards, out, model=str(tiny_llama))
    with pytest.raises(CacheError, match="pooling"):
        embed(shards, out, model=str(minilm_path), pooling="cls")
    s = embed(shards, out, model=str(tiny_llama), overwrite=True)
    assert s["shards_written"] == 3 and TextCache(out).dim == 64


def test_cli_embed_and_cache_info_detects_tampering(ray_local, tmp_path, capsys):
    shards = caption_shards(tmp_path / "src", n_shards=2, per_shard=2)
    src = str(tmp_path / "src" / "shard-{000..001}.tar")
    assert main(["embed-captions", src, "--out", str(tmp_path / "c"), "--model", "minilm",
                 "-f", "txt", "-f", "json:long_caption", "--no-progress"]) == 0  # fmt: skip
    assert main(["cache-info", str(tmp_path / "c")]) == 0
    assert "all shards valid" in capsys.readouterr().out
    f = tmp_path / "c" / f"{shards[0].stem}.parquet"
    t = pq.read_table(f)
    pq.write_table(t.slice(0, 1), f)
    assert main(["cache-info", str(tmp_path / "c")]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["auto", "ray"])  # auto: in the CLI's own process here
def test_kill_9_mid_job_then_rerun_equals_uninterrupted(ray_local, tmp_path, minilm_path, runner):
    shards = caption_shards(tmp_path / "src", n_shards=5, per_shard=150)
    ref = tmp_path / "ref"
    embed(shards, ref, model=str(minilm_path))

    out = tmp_path / "crashed"
    cmd = [*l2c_cli(), "embed-captions", *map(str, shards), "--out", str(out),
           "--model", str(minilm_path), "-f", "txt", "-f", "json:long_caption", "--no-progress", "--runner", runner]  # fmt: skip
    m = out / "manifest.json"
    n_done = kill_mid_job(cmd, {**os.environ, "RAY_ADDRESS": ""},
                          lambda: len(Manifest.load(out).shards) if m.exists() else 0, total=5)  # fmt: skip
    assert 1 <= n_done < 5
    s = embed(shards, out, model=str(minilm_path))
    assert s["shards_skipped"] == n_done and s["shards_written"] == 5 - n_done
    a, b = TextCache(ref), TextCache(out)
    assert a.manifest.to_dict()["shards"] == b.manifest.to_dict()["shards"]  # same files, rows and sha256
    assert not list(out.glob(".tmp-*"))


def test_make_shards_output_dir_and_an_empty_source(ray_local, minilm_path, tmp_path):
    """A directory as make-shards leaves it (tars + info.json + rejected.jsonl) embeds its tars only; a
    source with no usable caption beside one with captions gives an empty shard, not a crash (a job whose
    sources yield nothing at all is an error: tests/pipeline/test_crosscheck.py)."""
    src = tmp_path / "src"
    caption_shards(src, n_shards=1, per_shard=4)
    (src / "info.json").write_text(json.dumps({"shards": 1}))
    (src / "rejected.jsonl").write_text(json.dumps({"reason": "missing_image"}) + "\n")
    s = embed([src], tmp_path / "cache", model=str(minilm_path))
    assert s["shards_written"] == 1 and TextCache(tmp_path / "cache").shard_names == ["shard-000"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image_id": "a", "caption": ""}) + "\n")
    full = tmp_path / "full.jsonl"
    full.write_text(json.dumps({"image_id": "b", "caption": "a dog on grass"}) + "\n")
    s = embed([empty, full], tmp_path / "cache2", model=str(minilm_path), key_field="image_id",
              text_fields=["caption"])  # fmt: skip
    c = TextCache(tmp_path / "cache2")
    assert s["shards_written"] == 2 and len(c) == 1 and c.validate() == []
    assert c.manifest.shards["empty"].rows == 0 and c.manifest.shards["empty"].n_rejected == 1


def test_damaged_tar_embeds_its_readable_samples_and_is_retried(ray_local, minilm_path, tmp_path):
    src = tmp_path / "src"
    good = caption_shards(src, n_shards=2, per_shard=40)
    data = good[1].read_bytes()
    good[1].write_bytes(data[: len(data) // 2])  # a tar cut in half
    s = embed(good, tmp_path / "cache", model=str(minilm_path))
    assert s["shards_written"] == 2 and s["shards_failed"] == [] and s["shards_partial"] == ["shard-001"]
    assert s["rejected_by_reason_this_run"] == {"damaged_tar": 1}
    cache = TextCache(tmp_path / "cache")
    kept = cache.read_shard("shard-001")["key"].to_pylist()
    assert 0 < len(kept) < 80 and kept == [f"s01-{i:04d}" for i in range(len(kept) // 2) for _ in FIELDS]
    (reject,) = [r for r in cache.rejected() if r["shard"] == "shard-001"]
    assert str(good[1]) in reject["detail"] and cache.manifest.shards["shard-001"].partial
    again = embed(good, tmp_path / "cache", model=str(minilm_path))  # the partial shard is retried, not skipped
    assert again["shards_skipped"] == 1 and again["shards_written"] == 1 and again["shards_partial"] == ["shard-001"]


def test_config_file_overrides_and_flags(ray_local, tmp_path):
    """One config path: --config file, then key=value overrides, then flags given on the command line."""
    src = caption_shards(tmp_path / "src", n_shards=1, per_shard=3)
    out = tmp_path / "cache"
    assert main(["embed-captions", "--config", "embed/minilm_demo", str(src[0]), "max_length=64",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    s = TextCache(out).settings
    assert (s["max_length"], s["fields"], s["model"]) == (64, ["txt", "json:long_caption"], "minilm")
    out2 = tmp_path / "cache2"
    assert main(["embed-captions", "--config", "embed/minilm_demo", str(src[0]), "max_length=64", "--max-length", "96",
                 "-f", "txt", "--out", str(out2), "--no-progress"]) == 0  # fmt: skip
    s2 = TextCache(out2).settings
    assert (s2["max_length"], s2["fields"]) == (96, ["txt"])


def test_one_cpu_encoder_alone_writes_the_cache_three_stages_write(ray_local, tmp_path, minilm_path):
    """On CPUs one encoder actor reads, tokenizes and writes itself; with --read-actors the stages are separate
    actors and tasks. Both give the same rows, token counts and vectors."""
    shards = caption_shards(tmp_path / "src", n_shards=2, per_shard=5)
    kw = {"model": str(minilm_path), "store_dtype": "float32"}
    fused = embed(shards, tmp_path / "fused", **kw)
    staged = embed(shards, tmp_path / "staged", read_actors=1, **kw)
    assert fused["rows"] == staged["rows"] == 2 * 5 * 2 and fused["tokens_written"] == staged["tokens_written"]
    a, b = TextCache(tmp_path / "fused"), TextCache(tmp_path / "staged")
    assert a.validate() == [] and b.validate() == []
    for tar in shards:
        ta, tb = a.read_shard(tar.stem), b.read_shard(tar.stem)
        assert ta.select(["key", "field", "n_tokens"]).equals(tb.select(["key", "field", "n_tokens"]))
        assert np.abs(embedding_matrix(ta) - embedding_matrix(tb)).max() < 1e-5
