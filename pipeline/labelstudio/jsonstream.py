"""Stream the items of a top-level JSON array without loading the whole file.

Label Studio exports reach hundreds of MB. ``json.JSONDecoder.raw_decode``
(the C scanner) decodes one task at a time from a sliding buffer, which is
several times faster than an event-based parser and keeps memory at about a
buffer plus one task.

A byte range of the file can be read on its own (``start``/``stop``), so
several processes can convert one export side by side; ``find_item_start``
guesses where an item begins near an offset, and reading the previous range
proves the guess (``RangeMismatch`` otherwise).

Bytes that are not UTF-8, a task nested too deeply for the decoder, and a
corrupt gzip stream are ``ConversionError``s naming the file and the byte.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.core.errors import ConversionError, FileEncodingError
from pipeline.core.textfile import GZIP_MAGIC, not_utf8, refusal

_WHITESPACE = " \t\n\r"


class RangeMismatch(Exception):
    """A guessed item start turned out not to be one: read the file in one piece instead."""


def open_export(path: Path) -> IO[bytes]:
    """The file's bytes (decompressed if it is gzip); refuses encodings Label Studio does not write."""
    fh: IO[bytes] = path.open("rb")
    head = fh.read(64)
    if head.startswith(GZIP_MAGIC):
        fh.close()
        fh = gzip.open(path, "rb")
        try:
            head = fh.read(64)
        except (OSError, EOFError, zlib.error) as exc:
            fh.close()
            raise ConversionError(f"{path}: gzip data is corrupt or truncated ({exc})") from None
    fh.seek(0)
    reason = refusal(head)
    if reason is not None:
        fh.close()
        raise FileEncodingError(f"{path}: {reason}")
    return fh


class _Buffer:
    def __init__(self, path: Path, chunk_size: int, start: int = 0) -> None:
        self.fh = open_export(path)
        self.fh.seek(start)
        self.gzip = isinstance(self.fh, gzip.GzipFile)
        self.read_bytes = start  # bytes read from the (decompressed) file so far
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.path = path
        self.chunk_size = chunk_size
        self.text = ""
        self.pos = 0
        self.eof = False
        self.consumed_lines = 0  # newlines in text already dropped from the buffer
        self._synced_pos = 0     # text[:_synced_pos] holds _synced_byte - start bytes
        self._synced_byte = start

    def byte_offset(self, pos: int) -> int:
        """File offset of ``text[pos]`` (positions only move forward)."""
        self._synced_byte += len(self.text[self._synced_pos:pos].encode("utf-8"))
        self._synced_pos = pos
        return self._synced_byte

    def fill(self) -> bool:
        """Append a chunk, dropping what was already decoded; False at end of file."""
        if self.eof:
            return False
        raw = self._read()
        pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the last read
        try:
            chunk = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            offset = self.read_bytes - pending + exc.start
            raise FileEncodingError(f"{self.path}: {not_utf8(exc, offset)}{self._decompressed()}") from None
        self.read_bytes += len(raw)
        if not raw:
            self.eof = True
            if not chunk:
                return False
        if self.pos:
            self.byte_offset(self.pos)
            self._synced_pos = 0
            self.consumed_lines += self.text.count("\n", 0, self.pos)
            self.text = self.text[self.pos:]
            self.pos = 0
        self.text += chunk
        return True

    def _read(self) -> bytes:
        try:
            return self.fh.read(self.chunk_size)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConversionError(f"{self.path}: gzip data is corrupt or truncated ({exc})") from None

    def _decompressed(self) -> str:
        return " (offset in the decompressed data)" if self.gzip else ""

    def skip_whitespace(self) -> str | None:
        """Next significant character (not consumed), or None at end of file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.fill():
                return None

    def where(self, pos: int | None = None) -> str:
        pos = self.pos if pos is None else pos
        line = self.consumed_lines + self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {column}"

    def error(self, message: str, pos: int | None = None, problem: str = "not valid JSON") -> ConversionError:
        pos = self.pos if pos is None else pos
        if pos >= self._synced_pos:
            byte = self.byte_offset(pos)
        else:
            byte = self._synced_byte - len(self.text[pos:self._synced_pos].encode("utf-8"))
        where = f"byte {byte} of the decompressed data" if self.gzip else f"byte {byte}"
        return ConversionError(f"{self.path}: {problem} at {self.where(pos)} ({where}): {message}")


def iter_json_array(path: str | Path, chunk_size: int = 1 << 20, max_item_chars: int = 64 << 20, *,
                    start: int | None = None, stop: int | None = None) -> Iterator[Any]:
    """Yield each item of the JSON array in ``path``; errors name line and column.

    With ``start``, reading begins at that byte (an item's first byte) instead
    of the opening ``[``; with ``stop``, it ends before the item starting at
    that byte, and raises ``RangeMismatch`` if no item starts exactly there.
    """
    for _, item in _array_items(Path(path), chunk_size, max_item_chars, start, stop, offsets=False):
        yield item


def iter_json_array_at(path: str | Path, *, start: int | None = None,
                       stop: int | None = None) -> Iterator[tuple[int, Any]]:
    """``iter_json_array`` with each item's first byte: ``(offset, item)``, to read a range of it again later."""
    return _array_items(Path(path), 1 << 20, 64 << 20, start, stop, offsets=True)


def _array_items(path: Path, chunk_size: int, max_item_chars: int, start: int | None, stop: int | None,
                 offsets: bool) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    buf = _Buffer(path, chunk_size, start or 0)
    try:
        if start is None:
            if buf.skip_whitespace() == "\ufeff":
                buf.pos += 1
            if buf.skip_whitespace() != "[":
                raise buf.error("a Label Studio JSON export is a list of tasks (expected '[')")
            buf.pos += 1
            state = "start"  # start | after_comma | after_item
        else:
            state = "after_comma"
        while True:
            ch = buf.skip_whitespace()
            if ch is None:
                raise buf.error("the file ends inside the list (truncated export?)")
            if state == "after_item":
                if ch not in ",]":
                    raise buf.error(f"expected ',' or ']' between tasks, found {ch!r}")
                buf.pos += 1
                if ch == "]":
                    break
                state = "after_comma"
                continue
            if ch == "]":
                if state == "after_comma":
                    raise buf.error("trailing comma before ']'")
                buf.pos += 1
                break
            here = buf.byte_offset(buf.pos) if offsets or stop is not None else -1
            if stop is not None and here >= stop:
                if here != stop:
                    raise RangeMismatch(f"no item starts at byte {stop}")
                return
            item, buf.pos = _decode_item(buf, decoder, max_item_chars)
            state = "after_item"
            yield here, item
        if stop is not None:
            raise RangeMismatch(f"the list ended before byte {stop}")
        if buf.skip_whitespace() is not None:
            raise buf.error("unexpected data after the end of the list")
    finally:
        buf.fh.close()


def _decode_item(buf: _Buffer, decoder: json.JSONDecoder, max_item_chars: int) -> tuple[Any, int]:
    """The item starting at ``buf.pos`` and where it ends, reading more of the file as needed."""
    while True:
        try:
            item, end = decoder.raw_decode(buf.text, buf.pos)
            if end < len(buf.text) or buf.eof or not buf.fill():
                return item, end  # a number cut at the buffer's end would decode short: decode again
        except json.JSONDecodeError as exc:
            if len(buf.text) - buf.pos > max_item_chars or not buf.fill():
                raise buf.error(exc.msg, exc.pos) from None
        except RecursionError:
            raise buf.error("it nests lists or objects too deeply to decode (a Label Studio task nests a few "
                            "levels)", problem="an item that is not a task") from None


def iter_json_lines(path: str | Path) -> Iterator[Any]:
    """Yield the value on each non-blank line of a JSON Lines file (gzip too); errors name the line."""
    for _, item in iter_json_lines_at(path):
        yield item


def iter_json_lines_at(path: str | Path, *, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any]]:
    """``(offset of the line, value)`` for each non-blank line; ``start``/``stop`` read the lines that begin in
    that byte range (``start`` a line's first byte). Errors name the line, or its byte when reading from
    ``start`` (line numbers before it are unknown)."""
    path = Path(path)
    decoder = json.JSONDecoder()
    offset = start
    with open_export(path) as fh:
        fh.seek(start)
        for number, raw in enumerate(fh, 1):
            if stop is not None and offset >= stop:
                return
            where = f"line {number}" if not start else f"the line at byte {offset}"
            try:
                line = raw.decode("utf-8").lstrip("\ufeff" if offset == 0 else "").strip()
            except UnicodeDecodeError as exc:
                raise FileEncodingError(f"{path}: {where} {not_utf8(exc, offset + exc.start)}") from None
            here, offset = offset, offset + len(raw)
            if line:
                yield here, _line_value(decoder, line, path, where)


def _line_value(decoder: json.JSONDecoder, line: str, path: Path, where: str) -> Any:
    try:
        item, end = decoder.raw_decode(line)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON at {where}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ConversionError(f"{path}: {where} nests lists or objects too deeply to decode") from None
    if end != len(line):
        raise ConversionError(f"{path}: {where}, column {end + 1}: more than one JSON value on the "
                              "line (JSON Lines holds one task per line)")
    return item


def first_item_start(path: str | Path) -> int | None:
    """Byte offset of the first item, or None for an empty or malformed list."""
    with Path(path).open("rb") as fh:
        head = fh.read(1 << 16)
    i = 3 if head.startswith(codecs.BOM_UTF8) else 0
    while i < len(head) and head[i] in b" \t\r\n":
        i += 1
    if i >= len(head) or head[i:i + 1] != b"[":
        return None
    i += 1
    while i < len(head) and head[i] in b" \t\r\n":
        i += 1
    return i if head[i:i + 1] == b"{" else None


def find_item_start(path: str | Path, offset: int, window: int = 1 << 20) -> int | None:
    """A likely item start at or after ``offset``: a task object followed by ``,`` or ``]``.

    Only a guess (the text of a task could hold such an object); the caller
    proves it by reading the range before it up to exactly this byte.
    """
    decoder = json.JSONDecoder()
    with Path(path).open("rb") as fh:
        fh.seek(offset)
        data = fh.read(window)
    lead = 0  # continuation bytes of a character cut by the seek
    while lead < len(data) and 0x80 <= data[lead] < 0xC0:
        lead += 1
    text = data[lead:].decode("utf-8", errors="ignore")  # a character cut at the window's end is dropped
    i = text.find("{")
    while i != -1:
        try:
            item, end = decoder.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError):
            item = None
        if isinstance(item, dict) and "data" in item and "id" in item:
            if text[end:].lstrip(_WHITESPACE)[:1] in (",", "]"):
                return offset + lead + len(text[:i].encode("utf-8"))
        i = text.find("{", i + 1)
    return None
