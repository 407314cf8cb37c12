"""JSON data: a value nested too deeply and a string that is not Unicode are named where they are."""

import json

import pytest

from lightning_grass.app.data.json_text import check_unicode, parse_json
from lightning_grass.errors import DataFormatError

DEEP = "[" * 100_000 + "]" * 100_000

TOO_DEEP = (
    "JSON nested too deeply to read (arrays or objects inside one another, deeper than Python's JSON reader allows, "
    "about a thousand levels); a record is one object of strings, so the file is damaged or not instruction data"
)


def test_json_nested_too_deeply_is_named_where_it_is():
    with pytest.raises(DataFormatError) as refused:
        parse_json(DEEP, "data.jsonl, line 3")
    assert str(refused.value) == f"data.jsonl, line 3: {TOO_DEEP}"
    assert isinstance(refused.value.__cause__, RecursionError)
    assert parse_json("[" * 100 + "]" * 100, "data.json") == json.loads("[" * 100 + "]" * 100)


def test_invalid_json_is_named_where_it_is():
    with pytest.raises(DataFormatError) as refused:
        parse_json("{not json}", "data.json")
    assert str(refused.value) == (
        "data.json: invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )


@pytest.mark.parametrize(("escape", "at"), [("\\ud800", 3), ("\\udfff", 3), ("\\ude00\\ud83d", 3)])
def test_a_lone_surrogate_is_named_with_its_field_and_position(escape, at):
    value = json.loads(f'"abc{escape}"')
    with pytest.raises(DataFormatError) as refused:
        check_unicode(value, "data.json, record index 4", "output")
    code = escape[2:6]
    assert str(refused.value) == (
        f"data.json, record index 4: field 'output' holds the lone surrogate \\u{code} at character {at} (from 0), "
        "which is not a character: a JSON \\u escape between \\ud800 and \\udfff must be half of a surrogate pair. "
        "Replace it with the character meant, or remove it"
    )


def test_a_surrogate_pair_is_one_character():
    value = json.loads('"smile \\ud83d\\ude00"')
    assert check_unicode(value, "data.json, record index 0", "output") == "smile \U0001f600"
