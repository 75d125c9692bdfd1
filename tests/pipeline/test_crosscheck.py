"""What no single shard sees: a key in two sources is kept where it first occurs (source order) and rejected,
naming that source, in the later ones; a job that embeds nothing is an error naming the fields it found."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2c.cache import Manifest, TextCache
from l2c.cli import main
from l2c.pipeline.crosscheck import STAMP, _duplicates, drop_cross_duplicates, key_hashes, pack, unpack
from l2c.storage import Store


def jsonl(path, rows):
    path.write_text("".join(json.dumps({"image_id": k, "caption": c}) + "\n" for k, c in rows))
    return path


def embed(sources, out, *extra):
    return main(["embed-captions", *map(str, sources), "--out", str(out), "--key-field", "image_id",
                 "--text-field", "caption", "--model", "minilm", "--no-progress", *extra])  # fmt: skip


def test_hashes_and_the_first_owner():
    keys = ["a", "b", "a", "c"]
    h = key_hashes(keys)
    assert h.dtype == np.uint64 and len(h) == 3 and np.array_equal(unpack(pack(h)), h)
    a, b, c, d = (key_hashes([k]) for k in "abcd")
    arrays = [np.concatenate([a, b]), np.concatenate([c, a]), np.concatenate([b, a, d])]
    # key a: first in shard 0, repeated in 1 (position 1) and 2 (position 1); b: 0, repeated in 2 (position 0)
    assert _duplicates(arrays) == {1: {1: 0}, 2: {0: 0, 1: 0}}
    assert _duplicates([a, c, d]) == {} and _duplicates([]) == {}


def test_a_key_in_two_sources_stays_in_the_first(ray_local, tmp_path, capsys):
    s1 = jsonl(tmp_path / "s1.jsonl", [("a", "a dog on grass"), ("b", "a cat on a sofa")])
    s2 = jsonl(tmp_path / "s2.jsonl", [("c", "a cow in a field"), ("a", "a dog again")])
    s3 = jsonl(tmp_path / "s3.jsonl", [("b", "the cat again")])
    out = tmp_path / "cache"
    assert embed([s1, s2, s3], out) == 0
    assert "duplicate_key: 2" in capsys.readouterr().out.replace("\n", " ")
    cache = TextCache(out)
    assert {n: cache.read_shard(n)["key"].to_pylist() for n in cache.shard_names} == \
        {"s1": ["a", "b"], "s2": ["c"], "s3": []}  # fmt: skip
    rejected = [r for r in cache.rejected() if r["reason"] == "duplicate_key"]
    assert [(r["key"], r["source"], r["detail"]) for r in rejected] == [
        ("a", str(s2), f"key first in {s1}"), ("b", str(s3), f"key first in {s1}")]  # fmt: skip
    entries = cache.manifest.shards
    assert (entries["s2"].rows, entries["s2"].n_rejected, entries["s3"].rows) == (1, 1, 0)
    assert cache.validate() == [] and len(cache) == 3

    # a rerun changes nothing; a new source repeating a key loses it, the earlier rejects stay
    assert embed([s1, s2, s3], out) == 0
    assert len(TextCache(out).rejected()) == 2 and json.loads((out / STAMP).read_text())["shards"]
    s4 = jsonl(tmp_path / "s4.jsonl", [("a", "a third dog"), ("d", "a duck")])
    assert embed([s1, s2, s3, s4], out) == 0
    cache = TextCache(out)
    assert cache.read_shard("s4")["key"].to_pylist() == ["d"] and len(cache.rejected()) == 3

    # the source order decides, not the order shards finish in
    assert embed([s2, s1], tmp_path / "other") == 0
    other = TextCache(tmp_path / "other")
    assert other.read_shard("s1")["key"].to_pylist() == ["b"]
    assert [r["detail"] for r in other.rejected()] == [f"key first in {s2}"]


def test_strict_refuses_and_collisions_keep_their_rows(ray_local, refused, tmp_path):
    s1 = jsonl(tmp_path / "s1.jsonl", [("a", "a dog on grass")])
    s2 = jsonl(tmp_path / "s2.jsonl", [("a", "a dog again")])
    refused(["embed-captions", s1, s2, "--out", tmp_path / "strict", "--key-field", "image_id", "--text-field",
             "caption", "--model", "minilm", "--no-progress", "--strict"],
            rf"--strict: key 'a' of {s2} is already in {s1}")  # fmt: skip
    # two different keys whose hashes were equal: confirmed against the keys themselves, nothing dropped
    s3 = jsonl(tmp_path / "s3.jsonl", [("z", "a zebra")])
    assert embed([s1, s3], tmp_path / "c") == 0
    store = Store(tmp_path / "c")
    (tmp_path / "c" / STAMP).unlink()
    manifest = Manifest.load(store)
    forged = {"s1": key_hashes(["a"]), "s3": key_hashes(["a"])}  # s3 holds "z", hashed as if it were "a"
    assert drop_cross_duplicates(store, manifest, ["s1", "s3"], forged, strict=False, wrote=True) == {}
    assert TextCache(tmp_path / "c").read_shard("s3")["key"].to_pylist() == ["z"]


def test_nothing_embedded_is_an_error_naming_the_fields(ray_local, refused, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "cache"
    refused(["embed-captions", empty, "--out", out, "--key-field", "image_id", "--text-field", "caption",
             "--model", "minilm", "--no-progress"],
            rf"embed-captions wrote no vectors to {out}: {empty} holds no records")  # fmt: skip
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"image_id": "a", "text": "a dog", "meta": {"x": 1}}) + "\n")
    refused(["embed-captions", other, "--out", out, "--key-field", "image_id", "--text-field", "caption",
             "--model", "minilm", "--no-progress"],
            r"no record of .*other.jsonl has --text-field caption \(fields seen in the records: meta, text\); "
            r"rejected: missing_field: 1")  # fmt: skip
    blank = jsonl(tmp_path / "blank.jsonl", [("a", "   ")])
    refused(["embed-captions", blank, "--out", out, "--key-field", "image_id", "--text-field", "caption",
             "--model", "minilm", "--no-progress"], r"every caption of .*blank.jsonl was rejected \(empty: 1\)")
    # the empty cache is not kept as a cache of other settings: the right field embeds into the same --out
    assert main(["embed-captions", str(other), "--out", str(out), "--key-field", "image_id", "--text-field", "text",
                 "--model", "minilm", "--no-progress"]) == 0  # fmt: skip
    assert len(TextCache(out)) == 1


@pytest.mark.parametrize("field", ["caption", "json:caption"])
def test_nothing_embedded_from_tars_names_members_and_json_keys(ray_local, refused, tmp_path, field):
    from tests.pipeline.conftest import caption_shards

    tars = caption_shards(tmp_path / "src", n_shards=2, per_shard=3)
    err = refused(["embed-captions", *tars, "--out", tmp_path / "cache", "--text-field", field, "--model", "minilm",
                   "--no-progress"], rf"no record of the 2 sources has --text-field {field}")  # fmt: skip
    assert "json:long_caption" in err and "txt" in err
