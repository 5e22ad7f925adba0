"""Stream the items of a top-level JSON array without loading the whole file.

Label Studio exports reach hundreds of MB. ``json.JSONDecoder.raw_decode``
(the C scanner) decodes one task at a time from a sliding buffer, which is
several times faster than an event-based parser and keeps memory at about a
buffer plus one task.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import ConversionError

_WHITESPACE = " \t\n\r"


class _Buffer:
    def __init__(self, path: Path, chunk_size: int) -> None:
        self.fh = path.open(encoding="utf-8-sig")
        self.path = path
        self.chunk_size = chunk_size
        self.text = ""
        self.pos = 0
        self.eof = False
        self.consumed_lines = 0  # newlines in text already dropped from the buffer

    def fill(self) -> bool:
        """Append a chunk, dropping what was already decoded; False at end of file."""
        if self.eof:
            return False
        chunk = self.fh.read(self.chunk_size)
        if not chunk:
            self.eof = True
            return False
        if self.pos:
            self.consumed_lines += self.text.count("\n", 0, self.pos)
            self.text = self.text[self.pos:]
            self.pos = 0
        self.text += chunk
        return True

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

    def error(self, message: str, pos: int | None = None) -> ConversionError:
        return ConversionError(f"{self.path}: not valid JSON at {self.where(pos)}: {message}")


def iter_json_array(path: str | Path, chunk_size: int = 1 << 20, max_item_chars: int = 64 << 20) -> Iterator[Any]:
    """Yield each item of the JSON array in ``path``; errors name line and column."""
    path = Path(path)
    decoder = json.JSONDecoder()
    buf = _Buffer(path, chunk_size)
    try:
        first = buf.skip_whitespace()
        if first != "[":
            raise buf.error("a Label Studio JSON export is a list of tasks (expected '[')")
        buf.pos += 1
        state = "start"  # start | after_comma | after_item
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
            while True:
                try:
                    item, end = decoder.raw_decode(buf.text, buf.pos)
                    if end < len(buf.text) or buf.eof or not buf.fill():
                        break  # a number cut at the buffer's end would decode short: decode again
                    continue
                except json.JSONDecodeError as exc:
                    if len(buf.text) - buf.pos > max_item_chars or not buf.fill():
                        raise buf.error(exc.msg, exc.pos) from None
            buf.pos = end
            state = "after_item"
            yield item
        if buf.skip_whitespace() is not None:
            raise buf.error("unexpected data after the end of the list")
    finally:
        buf.fh.close()

