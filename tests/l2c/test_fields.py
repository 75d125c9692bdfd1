import pytest

from l2c.fields import BAD_JSON, MISSING, FieldSpec, FieldSpecError, check_known, covers, row_mask

SHAREGPT = "json:conversations[*].value"


def test_parse():
    assert FieldSpec.parse("txt") == FieldSpec("txt", None, ("txt",))
    assert FieldSpec.parse("json:long_caption").member == "json"
    assert FieldSpec.parse("captions[1]").path == ("captions", 1)
    assert FieldSpec.parse("json:meta.dense[*]").path == ("meta", "dense", "*")
    assert FieldSpec.parse(SHAREGPT).path == ("conversations", "*", "value")
    for bad in ("", "[0]", "a..b", "a[x]", "a[*][*]", "json:", "a[*].b[*]"):
        with pytest.raises(FieldSpecError):
            FieldSpec.parse(bad)


def test_extract_nested_star_names_each_element():
    rec = {"json": b'{"conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A dog.\\n\\nIt runs."}, {"from": "gpt"}]}'}
    got = FieldSpec.parse(SHAREGPT).extract(rec)
    assert got == [("json:conversations[0].value", "Describe."), ("json:conversations[1].value", "A dog.\n\nIt runs."),
                   ("json:conversations[2].value", MISSING)]  # fmt: skip
    assert FieldSpec.parse("json:x[*]").extract({"json": b"{not json"}) == [("json:x[0]", BAD_JSON)]
    assert FieldSpec.parse("captions[*]").extract({"captions": ["a", "b"]}) == [("captions[0]", "a"), ("captions[1]", "b")]
    assert FieldSpec.parse("txt").extract({}) == [("txt", MISSING)]


def test_covers_trailing_and_nested_star():
    assert covers("json:captions[*]", "json:captions[3]") and covers("txt", "txt")
    assert covers(SHAREGPT, "json:conversations[12].value")
    assert not covers(SHAREGPT, "json:conversations[1].from")
    assert not covers(SHAREGPT, "json:conversations[1]")
    assert not covers("json:captions[*]", "json:captions") and not covers("json:captions[0]", "json:captions[1]")
    assert not covers("json:captions[*]", "captions[0]")  # another member


def test_row_mask_and_check_known():
    rows = ["json:conversations[0].value", "json:conversations[1].value", "txt", "json:conversations[1].value"]
    assert row_mask(rows, [SHAREGPT]).tolist() == [True, True, False, True]
    assert row_mask(rows, ["json:conversations[1].value"]).tolist() == [False, True, False, True]
    check_known([SHAREGPT, "json:conversations[0].value"], [SHAREGPT, "txt"], "cache")
    check_known(["captions[*]"], ["captions[0]", "captions[1]"], "cache")  # a [*] spec over recorded rows
    with pytest.raises(FieldSpecError, match="'json:caption' is not in cache; it holds"):
        check_known(["json:caption"], [SHAREGPT], "cache")


def test_sharegpt_layout_embeds_pairs_and_trains(tmp_path):
    """ShareGPT4V's layout (`json:conversations[*].value`): every turn is embedded, train-vision pairs every image
    with its turns through the same spec, and eval's field selection takes them."""
    import json

    import numpy as np

    from l2c.cache import TextCache
    from l2c.config import load_config
    from l2c.pipeline.embed_job import EmbedConfig, run_embed
    from l2c.trainer.job import TrainJob
    from l2c.trainer.vision.config import TrainConfig
    from l2c.trainer.vision.loop import train
    from tests.pipeline.conftest import write_tar
    from tests.trainer.vision.train_helpers import TINY_VIT, class_image, jpeg_bytes

    rng = np.random.default_rng(0)
    tars = []
    for s in range(2):
        samples = []
        for i in range(8):
            turns = [{"from": "human", "value": "<image>\nDescribe the picture in detail."},
                     {"from": "gpt", "value": f"A shape of class {i % 4}.\n\nIt sits  on a dark ground."}]  # fmt: skip
            samples.append({"__key__": f"s{s}_{i}", "jpg": jpeg_bytes(class_image(i % 4, rng)),
                            "json": json.dumps({"conversations": turns})})  # fmt: skip
        tars.append(write_tar(tmp_path / f"sg-{s}.tar", samples))
    cache_dir = tmp_path / "cache"
    run_embed(EmbedConfig(sources=[str(t) for t in tars], out=str(cache_dir), text_fields=[SHAREGPT], progress=False))
    cache = TextCache(cache_dir)
    keys, fields, _ = cache.load(fields=[SHAREGPT])
    assert len(keys) == 32 and set(fields) == {"json:conversations[0].value", "json:conversations[1].value"}
    assert len(cache.load(fields=["json:conversations[1].value"])[0]) == 16

    cfg = load_config(TrainConfig, None, [f"model.vision.config={json.dumps(TINY_VIT)}", "model.embed_dim=16",
                                          "batch_size=8", "steps=2", "precision=fp32", "data.workers=0",
                                          f'data.caption_weights={{"{SHAREGPT}": 1}}', "checkpoint_every=10"])  # fmt: skip
    summary = train(TrainJob(cfg, [str(t) for t in tars], cache_dir, tmp_path / "run", progress=False))
    assert summary["finished"] and summary["skips"]["missing_vector"] == 0 and summary["samples_seen"] == 16
