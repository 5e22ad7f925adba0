"""Entity spans <-> per-word tags (BIO or BIOES).

Pure functions shared by conversion, evaluation and inference so the three
agree on what a tag sequence means.
"""

from __future__ import annotations

SCHEMES = ("BIO", "BIOES")


def tag_names(entity_types: list[str], scheme: str) -> list[str]:
    """All tags of a scheme, ``O`` first, in a stable order."""
    prefixes = "BI" if scheme == "BIO" else "BIES"
    return ["O"] + [f"{p}-{t}" for t in entity_types for p in prefixes]


def spans_to_tags(n_words: int, spans: list[tuple[int, int, str]], scheme: str) -> list[str]:
    """Tag words from ``(first_word, last_word_exclusive, type)`` spans (non-overlapping)."""
    tags = ["O"] * n_words
    for first, last, label in spans:
        length = last - first
        if length <= 0:
            continue
        if scheme == "BIOES" and length == 1:
            tags[first] = f"S-{label}"
            continue
        tags[first] = f"B-{label}"
        for i in range(first + 1, last):
            tags[i] = f"I-{label}"
        if scheme == "BIOES":
            tags[last - 1] = f"E-{label}"
    return tags


def tags_to_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """Decode ``(first_word, last_word_exclusive, type)`` spans from tags.

    Lenient like conlleval/seqeval's default mode: an ``I-`` (or ``E-``) that
    does not continue an entity of the same type starts a new one, so a
    model's slightly ill-formed output still yields entities. Two adjacent
    ``B-`` tags of the same type are two entities, never merged.
    """
    spans: list[tuple[int, int, str]] = []
    start: int | None = None
    current: str | None = None
    for i, tag in enumerate(tags):
        prefix, _, label = tag.partition("-")
        if prefix == "O" or not label:
            if current is not None:
                spans.append((start, i, current))
            start, current = None, None
            continue
        continues = current == label and prefix in ("I", "E")
        if not continues:
            if current is not None:
                spans.append((start, i, current))
            start, current = i, label
        if prefix in ("E", "S"):
            spans.append((start, i + 1, current))
            start, current = None, None
    if current is not None:
        spans.append((start, len(tags), current))
    return spans
