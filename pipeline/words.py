"""Split text into words with exact character offsets.

One splitter serves conversion (training data) and inference, so a word seen
at training time is cut the same way at prediction time. It follows the BERT
basic tokenizer (whitespace, then punctuation as separate words, one word per
CJK character) but never normalizes the text: every word is an exact slice
``text[start:end]`` in Python string indices (code points), which is what
Label Studio's offsets mean.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import regex

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Bopomofo}"
# Order matters: a CJK character (with its combining marks) is a word of its
# own; runs of letters, digits and marks form a word; any other grapheme
# cluster (punctuation, symbols, emoji incl. ZWJ sequences) stands alone.
# Format and control characters (zero-width spaces, BOM) are separators, as
# the BERT tokenizer drops them.
_WORD = regex.compile(
    rf"(?:[{_CJK}]\p{{M}}*)"
    rf"|(?:[[\p{{L}}\p{{N}}_\p{{M}}]--[{_CJK}]])+"
    r"|(?:(?![\s\p{Cc}\p{Cf}])\X)",
    flags=regex.V1,
)

Word = tuple[int, int]


def split_words(text: str) -> list[Word]:
    """Return ``(start, end)`` offsets of the words of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def split_at(words: Iterable[Word], cuts: Iterable[int]) -> list[Word]:
    """Split words at character positions so no word crosses an entity edge.

    Annotators may select part of a word ("#Obama" with only "Obama" marked);
    cutting the word keeps the annotation exact instead of widening it.
    """
    cut_points = sorted(set(cuts))
    result: list[Word] = []
    for start, end in words:
        i = bisect.bisect_right(cut_points, start)
        piece_start = start
        while i < len(cut_points) and cut_points[i] < end:
            result.append((piece_start, cut_points[i]))
            piece_start = cut_points[i]
            i += 1
        result.append((piece_start, end))
    return result
