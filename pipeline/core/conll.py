"""Read and write CoNLL files that keep character offsets.

Our format: one block per sentence, led by ``# task_id = N``, one line per
word: ``token<TAB>tag<TAB>start<TAB>end`` (offsets into the task's text, end
exclusive). The reader also takes plain two-column CoNLL-2003 style files
(``token tag``), so users can train on corpora they already have; such
sentences get offsets into the space-joined tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.atomic import atomic_open
from pipeline.core.errors import ConversionError


@dataclass
class Sentence:
    """One training sequence: a task's text cut into tagged words."""

    task_id: str
    text: str
    words: list[tuple[int, int]]
    tags: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        return [self.text[s:e] for s, e in self.words]


def format_sentence(sent: Sentence) -> str:
    """One CoNLL block, blank line included (built with C-level joins: conversion's hot path)."""
    text = sent.text
    starts = [s for s, _ in sent.words]
    ends = [e for _, e in sent.words]
    tokens = [text[s:e] for s, e in sent.words]
    rows = map("\t".join, zip(tokens, sent.tags, map(str, starts), map(str, ends)))
    return f"# task_id = {sent.task_id}\n" + "\n".join(rows) + "\n\n"


def write_conll(path: str | Path, sentences: Iterable[Sentence]) -> int:
    """Write sentences atomically; return how many were written."""
    count = 0
    with atomic_open(path) as fh:
        for sent in sentences:
            fh.write(format_sentence(sent))
            count += 1
    return count


def read_conll(path: str | Path) -> Iterator[Sentence]:
    """Yield sentences from our 4-column format or plain 2-column CoNLL."""
    path = Path(path)
    task_id: str | None = None
    rows: list[tuple[str, str, int | None, int | None]] = []
    auto_id = 0
    block_start = 1

    def flush() -> Sentence | None:
        nonlocal auto_id
        if not rows:
            return None
        auto_id += 1
        sid = task_id if task_id is not None else f"{path.name}:{block_start}"
        if all(r[2] is not None for r in rows):
            words = [(r[2], r[3]) for r in rows]
            length = max(e for _, e in words)
            chars = [" "] * length
            for (s, e), r in zip(words, rows):
                chars[s:e] = r[0]
            text = "".join(chars)
        else:
            pieces, words, pos = [], [], 0
            for r in rows:
                words.append((pos, pos + len(r[0])))
                pieces.append(r[0])
                pos += len(r[0]) + 1
            text = " ".join(pieces)
        return Sentence(str(sid), text, words, [r[1] for r in rows])

    if not path.is_file():
        raise ConversionError(f"{path}: CoNLL file not found")
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                sent = flush()
                if sent is not None:
                    yield sent
                rows, task_id, block_start = [], None, lineno + 1
                continue
            if line.startswith("# "):
                key, _, value = line[2:].partition("=")
                if key.strip() == "task_id":
                    task_id = value.strip()
                continue
            if line.startswith("-DOCSTART-"):
                continue
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) == 4 and "\t" in line:
                try:
                    start, end = int(cols[2]), int(cols[3])
                except ValueError:
                    raise ConversionError("start/end columns are not integers", line=lineno) from None
                if start < 0 or end <= start or end - start != len(cols[0]):
                    raise ConversionError(f"offsets {start}..{end} do not fit token {cols[0]!r}", line=lineno)
                rows.append((cols[0], cols[1], start, end))
            elif len(cols) >= 2:
                rows.append((cols[0], cols[-1], None, None))
            else:
                raise ConversionError(f"expected 'token<TAB>tag[<TAB>start<TAB>end]', got {line!r}",
                                      line=lineno)
    sent = flush()
    if sent is not None:
        yield sent
