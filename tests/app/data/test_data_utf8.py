from __future__ import annotations

import pytest
from unreadable_files import make_unreadable

import lightning_grass.app.data.utf8 as utf8
from lightning_grass.app.data.utf8 import check_utf8, read_utf8
from lightning_grass.errors import DataFormatError, MissingPathError

# Two-, three- and four-byte characters, so that small chunks cut characters at every position.
TEXT = "naïve\r\ncafé — 😀\n\n€uro\n"


def _message(path, line, offset, byte, reason):
    return (
        f"{path}, line {line}: byte 0x{byte:02x} at byte offset {offset} (from 0) is not valid UTF-8 ({reason}); "
        "data files must be UTF-8, so convert the file (e.g. with iconv) or fix that byte"
    )


def _errors(path):
    messages = []
    for check in (read_utf8, check_utf8):
        with pytest.raises(DataFormatError) as info:
            check(path)
        messages.append(str(info.value))
    return messages


def test_valid_text_and_bom(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_bytes(TEXT.encode())
    assert read_utf8(path) == TEXT
    check_utf8(path)
    path.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    assert read_utf8(path) == TEXT
    check_utf8(path)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 1 << 20])
def test_chunked_check_names_the_same_line_and_offset(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(utf8, "_CHUNK_BYTES", chunk_bytes)
    data = TEXT.encode()
    path = tmp_path / "bad.txt"
    valid = tmp_path / "ok.txt"
    valid.write_bytes(data)
    check_utf8(valid)
    # A stray continuation byte on line 4, a lead byte without its continuation, a cut character at the end.
    stray = data.index("€".encode()) + 1
    path.write_bytes(data[:stray] + data[stray + 1 :])
    assert _errors(path) == [_message(path, 4, stray - 1, 0xE2, "invalid continuation byte")] * 2
    path.write_bytes(data + b"\x80")
    assert _errors(path) == [_message(path, 5, len(data), 0x80, "invalid start byte")] * 2
    path.write_bytes(data + "😀".encode()[:3])
    assert _errors(path) == [_message(path, 5, len(data), 0xF0, "unexpected end of data")] * 2


def test_a_file_without_read_permission_is_named_by_both_readers(tmp_path, monkeypatch):
    path = tmp_path / "secret.json"
    path.write_bytes(TEXT.encode())
    make_unreadable(path, monkeypatch)
    for read in (read_utf8, check_utf8):
        with pytest.raises(MissingPathError) as refused:
            read(path)
        assert str(refused.value) == (
            f"{path} is not readable (Permission denied): give the user running this read permission on it "
            "(chmod a+r), or point to a readable copy"
        )
        assert isinstance(refused.value.__cause__, PermissionError)
