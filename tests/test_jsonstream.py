import json

import pytest

from pipeline.core.errors import ConversionError
from pipeline.labelstudio.jsonstream import iter_json_array


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


def write_bytes(tmp_path, data):
    path = tmp_path / "export.json"
    path.write_bytes(data)
    return path


def test_deep_nesting_is_one_error_naming_the_place_not_a_recursion_error(tmp_path):
    path = write_bytes(tmp_path, b'[{"id": 1}, \n {"id": 2, "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]")
    with pytest.raises(ConversionError, match=r"line 2, column 2 \(byte 14\): it nests .* too deeply"):
        list(iter_json_array(path))


@pytest.mark.parametrize("chunk_size", [3, 1 << 20])
def test_gzip_export_is_read_as_the_json_inside(tmp_path, chunk_size):
    import gzip

    items = [{"id": i, "data": {"text": "北京 😀"}} for i in range(50)]
    path = write_bytes(tmp_path, gzip.compress(("\ufeff" + json.dumps(items, ensure_ascii=False)).encode()))
    assert list(iter_json_array(path, chunk_size=chunk_size)) == items


def test_corrupt_gzip_is_one_error(tmp_path):
    import gzip

    data = gzip.compress(json.dumps([{"id": i} for i in range(5000)]).encode())
    path = write_bytes(tmp_path, data[:len(data) // 2])
    with pytest.raises(ConversionError, match="gzip data is corrupt or truncated"):
        list(iter_json_array(path))


TEXT = json.dumps([{"id": 1, "data": {"text": "Zoë in Köln"}}], ensure_ascii=False)


@pytest.mark.parametrize("data,message", [
    (TEXT.encode("latin-1"), r"is not UTF-8: byte 31 \(0xEB\)"),
    (TEXT.encode("utf-16"), r"is UTF-16LE \(byte-order mark at byte 0\)"),
    (TEXT.encode("utf-16-be"), r"NUL byte at byte 0: UTF-16 or UTF-32 without a byte-order mark"),
    (TEXT.encode("utf-32"), r"is UTF-32LE"),
    (b"PK\x03\x04" + b"\x00" * 40, "is a zip archive"),
    (b"[" + b'{"id": "\xc3\xa9"}, ' * 400 + b'{"id": "caf\xe9"}]', r"is not UTF-8: byte 5612 \(0xE9\)"),
])
@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
def test_other_encodings_are_refused_naming_the_file_and_byte(tmp_path, data, message, chunk_size):
    path = write_bytes(tmp_path, data)
    with pytest.raises(ConversionError, match=message) as caught:
        list(iter_json_array(path, chunk_size=chunk_size))
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)
