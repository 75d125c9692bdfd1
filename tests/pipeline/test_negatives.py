"""`l2c mine-negatives` on a small real cache (MiniLM vectors of Flickr8k dev captions, three shards): the
neighbours a brute-force numpy search finds, exact with the flat and an IVF index, most of them with the
bounded-memory ivfpq index; one Parquet per cache shard; resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from l2c.cache import TextCache
from l2c.cli import main
from l2c.pipeline.negatives import MineConfig, run_mine

CAPTIONS = "flickr8k_dev_captions.jsonl"  # under ../shared/data


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory, minilm_path, shared_data):
    """90 Flickr8k dev photos' five captions each, embedded with the packaged MiniLM into 3 shards."""
    root = tmp_path_factory.mktemp("negatives")
    records = [json.loads(line) for line in (shared_data / CAPTIONS).read_text().splitlines()[:90]]
    sources = []
    for s in range(3):
        p = root / f"part-{s}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in records[30 * s : 30 * (s + 1)]))
        sources.append(str(p))
    assert main(["embed-captions", *sources, "--out", str(root / "cache"), "--model", str(minilm_path), "--key-field",
                 "image_id", "--text-field", "captions[*]", "--runner", "local", "--no-progress"]) == 0  # fmt: skip
    return root / "cache"


def brute_force(cache: Path, k: int, fields: list[str] | None = None) -> dict[str, tuple[list[str], np.ndarray]]:
    """key -> (its k nearest other keys, their cosines) by numpy over every key's mean caption vector."""
    c = TextCache(cache)
    keys, flds, vecs = c.load(fields)
    vecs = vecs.astype(np.float64) / np.linalg.norm(vecs, axis=1, keepdims=True)
    names = list(dict.fromkeys(keys))
    at = {k_: i for i, k_ in enumerate(names)}
    x = np.zeros((len(names), vecs.shape[1]))
    np.add.at(x, [at[k_] for k_ in keys], vecs)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    out = {}
    for i, key in enumerate(names):
        top = np.argsort(-sims[i], kind="stable")[:k]
        out[key] = ([names[j] for j in top], sims[i, top])
    return out


def mined(out: Path, cache: Path) -> dict[str, tuple[list[str], list[float]]]:
    got = {}
    for name in TextCache(cache).shard_names:
        t = pq.read_table(out / f"{name}.parquet")
        assert t.column("key").to_pylist() == list(dict.fromkeys(TextCache(cache).read_shard(name)["key"].to_pylist()))
        for key, nb, sc in zip(*(t.column(c).to_pylist() for c in ("key", "neighbors", "scores")), strict=True):
            got[key] = (nb, sc)
    return got


@pytest.mark.parametrize("index", ["auto", "IVF4,Flat"])
def test_neighbours_equal_a_brute_force_search(real_cache, tmp_path, index):
    out = tmp_path / "negatives"
    assert main(["mine-negatives", "--text-cache", str(real_cache), "--out", str(out), "--k", "6", "--index", index,
                 "--nprobe", "4", "--no-progress"]) == 0  # fmt: skip
    want, got = brute_force(real_cache, 6), mined(out, real_cache)
    assert set(got) == set(want) and len(got) == 90
    for key, (nb, sc) in got.items():
        assert nb == want[key][0], key  # the same keys, nearest first, never the key itself
        np.testing.assert_allclose(sc, want[key][1], atol=2e-3)  # float16 vectors in the cache
    meta = json.loads((out / "negatives.json").read_text())
    assert meta["finished"] and meta["keys"] == 90 and meta["index"] == ("flat" if index == "auto" else index)


def test_default_place_field_choice_resume_and_refusals(real_cache, tmp_path, capsys):
    """Into TEXT_CACHE/negatives by default (where train-vision looks); --field picks the averaged captions; a
    rerun writes nothing; other settings there, or another command's folder, are one-line refusals."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(real_cache, cache)
    s = run_mine(MineConfig(str(cache), k=3, fields=["captions[0]"], progress=False))
    assert s["out"] == str(cache / "negatives") and s["shards_written"] == 3
    want = brute_force(cache, 3, ["captions[0]"])
    assert {k: v[0] for k, v in mined(cache / "negatives", cache).items()} == {k: v[0] for k, v in want.items()}
    assert TextCache(cache).validate() == []  # the cache itself is untouched
    again = run_mine(MineConfig(str(cache), k=3, fields=["captions[0]"], progress=False))
    assert again["shards_written"] == 0
    (cache / "negatives" / "part-1.parquet").unlink()  # a stop after two shards: the third is written
    assert run_mine(MineConfig(str(cache), k=3, fields=["captions[0]"], progress=False))["shards_written"] == 1
    assert main(["mine-negatives", "--text-cache", str(cache), "--k", "5", "--no-progress"]) == 2
    assert "mined with other settings" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["mine-negatives", "--text-cache", str(cache), "--out", str(other), "--no-progress"]) == 2
    assert "did not write" in capsys.readouterr().err and (other / "notes.txt").exists()


def test_ivfpq_index_finds_most_neighbours(real_cache, tmp_path):
    """The bounded-memory recipe (PCA, IVF with an HNSW coarse quantizer, PQ) trained on a sample: most of the
    true neighbours found, each key's own never among them."""
    s = run_mine(MineConfig(str(real_cache), out=str(tmp_path / "n"), k=5, index="ivfpq", pca_dim=32, pq=8, nlist=4,
                            nprobe=4, train_size=60, progress=False))  # fmt: skip
    assert s["index"] == "ivfpq" and (tmp_path / "n" / "index.faiss").exists()
    want, got = brute_force(real_cache, 5), mined(tmp_path / "n", real_cache)
    overlap = np.mean([len(set(got[k][0]) & set(want[k][0])) / 5 for k in want])
    assert overlap > 0.5, overlap
    assert all(k not in got[k][0] and len(got[k][0]) == 5 for k in got)
