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
