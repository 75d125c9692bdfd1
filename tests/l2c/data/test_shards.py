"""The one tar reader and the one shard expander, on real tars (tarfile / webdataset writers).

Every path that reads tars (embed-captions' source reader, the trainer's image stream, eval's image reader)
must see the same samples and count the same rejects: the trainer zips the text cache's rows, in tar key
order, with its image stream, so a reader that groups differently would shift or drop pairs.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from l2c.data.shards import (
    Sample,
    ShardSpecError,
    TarReject,
    count_keys,
    expand_shards,
    read_tar,
    split_member,
)
from l2c.errors import L2CError

DIM = 8


def png(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A real tar holding `members` exactly as named (duplicates and upper-case suffixes included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def odd_tars(root: Path) -> tuple[Path, Path]:
    """(a tar with upper/mixed-case suffixes, a tar with members duplicated inside a sample)."""
    case = write_members(root / "case.tar", [
        ("c0.JPG", png(0)), ("c0.TXT", b"an upper-case pair"),
        ("c1.jpg", png(1)), ("c1.txt", b"a lower-case pair"),
        ("c2.Jpeg", png(2)), ("c2.Txt", b"a mixed-case pair"),
        ("c3.TXT", b"a caption without an image"),
    ])  # fmt: skip
    dup = write_members(root / "dup.tar", [
        ("d0.jpg", png(3)), ("d0.txt", b"fine"),
        ("d1.jpg", png(4)), ("d1.txt", b"first"), ("d1.txt", b"second"),  # the same member twice
        ("d2.jpg", png(5)), ("d2.JPG", png(6)), ("d2.txt", b"jpg twice, in two cases"),
        ("d3.png", png(7, "PNG")), ("d3.txt", b"fine too"),
    ])  # fmt: skip
    return case, dup


EXPECTED_KEYS = {"case": ["c0", "c1", "c2", "c3"], "dup": ["d0", "d3"]}
EXPECTED_REJECTS = {"case": [], "dup": [("d1", "d1.txt"), ("d2", "d2.JPG")]}


# ------------------------------------------------------------------------------------------ reader


def test_reader_groups_by_key_and_matches_suffixes_ignoring_case(tmp_path):
    case, dup = odd_tars(tmp_path)
    rejects: list = []
    samples = list(read_tar(str(case), rejects))
    assert [s["__key__"] for s in samples] == EXPECTED_KEYS["case"] and rejects == []
    c0 = samples[0]
    assert isinstance(c0, Sample) and sorted(c0) == ["JPG", "TXT", "__key__", "__url__"]  # kept as written
    assert "jpg" in c0 and c0["txt"] == b"an upper-case pair" and c0.get("Txt") == b"an upper-case pair"
    assert c0.member("jpg") == "JPG" and c0["__url__"] == str(case)
    assert "jpeg" in samples[2] and "jpg" not in samples[3] and samples[3].get("jpg") is None

    samples = list(read_tar(str(dup), rejects))
    assert [s.key for s in samples] == EXPECTED_KEYS["dup"]
    assert all(isinstance(r, TarReject) and r.reason == "duplicate_member" for r in rejects)
    assert [(r.key, r.member) for r in rejects] == EXPECTED_REJECTS["dup"]
    assert str(dup) in rejects[0].detail and "'d1.txt'" in rejects[0].detail  # names the tar and the member


def test_member_names_split_the_webdataset_way(tmp_path):
    assert split_member("a/b/k01.seg.png") == ("a/b/k01", "seg.png")
    assert split_member("k.JPG") == ("k", "JPG")
    assert split_member("README") == (None, None)
    tar = write_members(tmp_path / "t.tar", [
        ("__index__", b"meta"), ("dir/k0.jpg", b"x"), ("dir/k0.seg.png", b"y"), ("k0.jpg", b"z"), ("noext", b""),
    ])  # fmt: skip
    samples = list(read_tar(str(tar)))
    assert [(s.key, sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("dir/k0", ["jpg", "seg.png"]), ("k0", ["jpg"]),
    ]  # fmt: skip
    assert count_keys(str(tar)) == 2


@pytest.mark.parametrize("cut", ["mid_member", "header_boundary", "garbage"])
def test_truncated_tar_keeps_its_readable_samples(tmp_path, cut):
    good = write_members(tmp_path / "good.tar", [(f"k{i}.{ext}", bytes([i]) * 700) for i in range(6)
                                                  for ext in ("jpg", "txt")])  # fmt: skip
    data = good.read_bytes()
    # each member: one 512-byte header + 2 data blocks; sample k<i> starts at block 6 * i
    cuts = {"mid_member": data[: 512 * (6 * 3 + 2) + 100], "header_boundary": data[: 512 * 6 * 3 + 512 * 3],
            "garbage": data[: 512 * 6 * 3 + 512 * 3] + b"\x00garbage" * 300}  # fmt: skip
    broken = tmp_path / "broken.tar"
    broken.write_bytes(cuts[cut])
    rejects: list = []
    samples = list(read_tar(str(broken), rejects))
    assert [s.key for s in samples] == ["k0", "k1", "k2"]  # k3 was being read: it may be incomplete
    assert samples[2]["txt"] == bytes([2]) * 700
    assert len(rejects) == 1 and rejects[0].reason == "unreadable_tar" and str(broken) in rejects[0].detail
    assert "'k3'" in rejects[0].detail


def test_unopenable_and_gzipped_tars(tmp_path):
    rejects: list = []
    assert list(read_tar(str(tmp_path / "missing.tar"), rejects)) == []
    assert [r.reason for r in rejects] == ["unreadable_tar"] and "missing.tar" in rejects[0].detail
    case, _ = odd_tars(tmp_path)
    import gzip

    gz = tmp_path / "case.tar.gz"
    gz.write_bytes(gzip.compress(case.read_bytes()))
    assert [s.key for s in read_tar(str(gz))] == EXPECTED_KEYS["case"]


def test_reader_streams_fsspec_files_and_urls(tmp_path):
    import fsspec

    case, dup = odd_tars(tmp_path)
    fs = fsspec.filesystem("memory")
    fs.pipe("/l2c-test-shards/case.tar", case.read_bytes())
    fs.pipe("/l2c-test-shards/dup.tar", dup.read_bytes())
    try:
        urls = expand_shards("memory://l2c-test-shards/*.tar")
        assert urls == ["memory://l2c-test-shards/case.tar", "memory://l2c-test-shards/dup.tar"]
        rejects: list = []
        assert [s.key for s in read_tar(urls[1], rejects)] == EXPECTED_KEYS["dup"] and len(rejects) == 2
        with fsspec.open(urls[0], "rb") as f:  # an open file object is read as it is, and left open
            assert [s.key for s in read_tar(urls[0], fileobj=f)] == EXPECTED_KEYS["case"]
            assert not f.closed
    finally:
        fs.rm("/l2c-test-shards", recursive=True)


# ---------------------------------------------------------------------------------------- expander


def test_expander_paths_globs_braces_directories(tmp_path):
    for i in range(3):
        write_members(tmp_path / "d" / f"shard-{i:03d}.tar", [(f"k{i}.txt", b"x")])
    (tmp_path / "d" / "notes.md").write_text("not a shard")
    d = tmp_path / "d"
    want = [str((d / f"shard-{i:03d}.tar").resolve()) for i in range(3)]
    assert expand_shards(str(d / "shard-{000..002}.tar")) == want
    assert expand_shards([str(d / "*.tar")]) == want
    assert expand_shards(d) == want  # a directory: its tars, sorted
    assert expand_shards(f"{d}/shard-000.tar::{d}/shard-{{001..002}}.tar") == want
    assert expand_shards([f"file://{d}/shard-001.tar", str(d / "*.tar")]) == [want[1], want[0], want[2]]  # once each
    assert expand_shards("pipe:cat a.tar") == ["pipe:cat a.tar"]
    for bad, msg in ((str(d / "none-*.tar"), "no file matches"), (str(d / "missing.tar"), "does not exist"),
                     (str(tmp_path / "empty"), "holds no")):  # fmt: skip
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(ShardSpecError, match=msg) as e:
            expand_shards(bad)
        assert isinstance(e.value, L2CError) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(ShardSpecError, match="unknown source type"):
        expand_shards(str(d / "notes.md"), require_suffix=True, what="source")


def test_every_path_expands_the_same(tmp_path):
    """embed-captions, train-vision and eval take the same specs to the same list."""
    from l2c.eval.features import expand_shards as eval_expand
    from l2c.pipeline.sources import expand_sources

    for i in range(2):
        write_members(tmp_path / f"shard-{i}.tar", [(f"k{i}.txt", b"x")])
    spec = [str(tmp_path / "shard-{0..1}.tar"), str(tmp_path / "*.tar")]
    assert expand_sources(spec) == eval_expand(spec) == expand_shards(spec)


# ----------------------------------------------------------------------------- one reader, every path


def test_every_path_sees_the_same_samples_and_rejects(tmp_path):
    case, dup = odd_tars(tmp_path / "tars")
    tars = [dup, case]

    # embed-captions: the rows the cache holds, and the counted rejects (each naming its tar)
    from l2c.pipeline.sources import read_shard

    rows = {tar.stem: read_shard(str(tar), tar.stem, ["txt"]) for tar in tars}
    assert [k for r in rows.values() for k in r.keys] == EXPECTED_KEYS["dup"] + EXPECTED_KEYS["case"]
    assert [(x["key"], x["reason"]) for r in rows.values() for x in r.rejects] == [
        ("d1", "duplicate_member"), ("d2", "duplicate_member")]  # fmt: skip
    assert all(str(dup) in x["detail"] for x in rows["dup"].rejects) and rows["dup"].n_samples == 4

    # train-vision: a shard-aligned cache of exactly those rows, zipped with the image stream
    from l2c.cache import TextCache
    from l2c.trainer.vision.data import StreamSpec
    from l2c.trainer.vision.loader import make_loader
    from l2c.trainer.vision.pairing import plan_pairing
    from l2c.trainer.vision.tower import ImageSpec
    from tests.trainer.vision.train_helpers import write_cache

    vec = np.ones(DIM, np.float32)
    shards = {t.stem: (str(t), [(k, f, vec) for k, f in zip(rows[t.stem].keys, rows[t.stem].fields, strict=True)])
              for t in tars}  # fmt: skip
    cache = write_cache(tmp_path / "cache", shards, DIM, ["txt"])
    pairing = plan_pairing(TextCache(cache), [str(t) for t in tars], "aligned", ["txt"], tmp_path / "index")
    assert pairing.mode == "aligned"
    spec = StreamSpec(shards=[str(t) for t in tars], pairing=pairing,
                      image_spec=ImageSpec([16, 16], None, [0.5] * 3, [0.5] * 3), batch_size=5,
                      shuffle_shards=False, shuffle_buffer=0)  # fmt: skip
    batch = next(iter(make_loader(spec)))
    assert batch["keys"] == ["d0", "d3", "c0", "c1", "c2"]  # .JPG, .Jpeg and .png decoded; c3 has no image
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    assert batch["stats"] == {"duplicate_member": 2}  # no missing_vector, no misordered: the two agree
    assert batch["examples"] == {"duplicate_member": ["d1", "d2"]}

    # eval: image features of the same samples, the same rejects skipped with their reasons
    from l2c.eval.features import extract_image_features
    from l2c.eval.model import load_model
    from tests.eval.eval_reference import export_tiny_model

    settings = {"model": "test", "dim": DIM, "fields": ["txt"], "model_fingerprint": "f", "store_dtype": "float32"}
    model = load_model(export_tiny_model(tmp_path / "run", DIM, settings))
    feats = extract_image_features(model, [str(t) for t in tars], batch_size=4, fields=("txt",))
    assert feats.keys == ["d0", "d3", "c0", "c1", "c2"] and feats.features.shape[0] == 5
    assert feats.values["txt"][2] == "an upper-case pair"  # `txt` finds c0.TXT
    skipped = {k: reason for k, reason in feats.skipped}
    assert sorted(skipped) == ["c3", "d1", "d2"] and skipped["c3"].startswith("no image member")
    assert skipped["d1"].startswith("duplicate_member: ") and "'d1.txt'" in skipped["d1"] and str(dup) in skipped["d1"]


def test_truncated_tar_on_every_path(tmp_path):
    """The readable samples are kept by the reader; what each command then does is its own policy:
    train-vision uses them and counts a shard_error, embed-captions embeds them and marks the shard partial
    (a rerun retries it), eval refuses to report figures on part of a test set."""
    from l2c.eval.errors import EvalError
    from l2c.eval.features import iter_samples
    from l2c.pipeline.sources import read_shard

    good = write_members(tmp_path / "good.tar", [(f"k{i}.{ext}", png(i) if ext == "jpg" else b"caption")
                                                  for i in range(4) for ext in ("jpg", "txt")])  # fmt: skip
    with tarfile.open(good) as tf:
        cut = next(m.offset_data for m in tf.getmembers() if m.name == "k2.jpg") + 10  # inside k2's image
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good.read_bytes()[:cut])
    rejects: list = []
    kept = [s.key for s in read_tar(str(broken), rejects)]
    assert kept == ["k0", "k1"] and [r.reason for r in rejects] == ["unreadable_tar"]

    rows = read_shard(str(broken), "broken", ["txt"])  # embed-captions: the readable samples, marked partial
    assert rows.keys == ["k0", "k1"] and rows.partial and [r["reason"] for r in rows.rejects] == ["damaged_tar"]
    assert str(broken) in rows.rejects[0]["detail"]

    with pytest.raises(EvalError, match="could not be read whole"):
        list(iter_samples([str(broken)]))

    from l2c.trainer.vision.data import StreamSpec
    from l2c.trainer.vision.loader import make_loader
    from l2c.trainer.vision.pairing import Pairing
    from l2c.trainer.vision.tower import ImageSpec
    from tests.trainer.vision.train_helpers import write_cache

    rows = [(f"k{i}", "txt", np.ones(DIM, np.float32)) for i in range(4)]
    cache = write_cache(tmp_path / "cache", {"broken": (str(broken), rows), "good": (str(good), rows)}, DIM, ["txt"])
    spec = StreamSpec(shards=[str(broken), str(good)], image_spec=ImageSpec([16, 16], None, [0.5] * 3, [0.5] * 3),
                      pairing=Pairing(cache, ["txt"], shard_names={str(broken): "broken", str(good): "good"}),
                      batch_size=3, shuffle_shards=False)  # fmt: skip
    batch = next(iter(make_loader(spec)))
    assert batch["keys"] == ["k0", "k1", "k0"]  # broken's readable samples, then good's
    assert batch["stats"] == {"vector_without_image": 2, "shard_error": 1}
    assert str(broken) in batch["examples"]["shard_error"][0]
