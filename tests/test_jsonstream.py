import json

import pytest

from pipeline.errors import ConversionError
from pipeline.jsonstream import iter_json_array


def write(tmp_path, text):
    path = tmp_path / "export.json"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 64, 1 << 20])
def test_items_stream_across_any_chunk_boundary(tmp_path, chunk_size):
    items = [{"id": i, "data": {"text": "北京 😀 " * i}, "n": 12345 + i} for i in range(20)] + [123456789, "x"]
    path = write(tmp_path, json.dumps(items, ensure_ascii=False, indent=1))
    assert list(iter_json_array(path, chunk_size=chunk_size)) == items


@pytest.mark.parametrize("text,message", [
    ('{"id": 1}', "expected '\\['"),
    ('[{"id": 1},\n {"id": 2}', "ends inside the list"),
    ('[{"id": 1},\n {"id": 2,}]', "line 2, column 10"),
    ('[{"id": 1} {"id": 2}]', "expected ',' or ']'"),
    ('[{"id": 1},]', "trailing comma"),
    ('[{"id": 1}] extra', "after the end"),
])
def test_malformed_json_names_the_place(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConversionError, match=message):
        list(iter_json_array(path, chunk_size=4))


def test_empty_list_and_bom(tmp_path):
    assert list(iter_json_array(write(tmp_path, "\ufeff [ ] \n"))) == []
