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


def _parts(tag: str) -> tuple[str, str]:
    prefix, _, label = tag.partition("-")
    return prefix, label


def allowed_transitions(tags: list[str], scheme: str) -> tuple[list[bool], list[list[bool]], list[bool]]:
    """Which tags may start a sequence, follow each tag, and end a sequence.

    Returned as ``(start[j], follows[i][j], end[i])``. A CRF that may score
    ``O -> I-PER`` wastes probability mass on sequences no decoder can read as
    entities; forbidding them outright is the classic BiLSTM-CRF constraint.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; expected one of {SCHEMES}")
    parts = [_parts(t) for t in tags]

    def may_start(prefix: str) -> bool:
        return prefix in ("O", "B", "S")

    def may_follow(prev: tuple[str, str], nxt: tuple[str, str]) -> bool:
        (p_prefix, p_label), (n_prefix, n_label) = prev, nxt
        if scheme == "BIO":
            return n_prefix != "I" or (p_prefix in ("B", "I") and p_label == n_label)
        inside = p_prefix in ("B", "I")  # BIOES: an open entity must go on (I) or close (E), same type
        if inside:
            return n_prefix in ("I", "E") and n_label == p_label
        return may_start(n_prefix)

    def may_end(prefix: str) -> bool:
        return scheme == "BIO" or prefix in ("O", "E", "S")

    start = [may_start(p) for p, _ in parts]
    follows = [[may_follow(a, b) for b in parts] for a in parts]
    end = [may_end(p) for p, _ in parts]
    return start, follows, end


def first_violation(sequence: list[str], scheme: str) -> int | None:
    """Index of the first tag the scheme forbids at its place, or None."""
    for i, tag in enumerate(sequence):
        prefix, label = _parts(tag)
        prev = _parts(sequence[i - 1]) if i else ("O", "")
        if scheme == "BIO":
            bad = prefix == "I" and not (prev[0] in ("B", "I") and prev[1] == label)
        else:
            open_before = prev[0] in ("B", "I")
            bad = (prefix in ("I", "E")) != open_before or (open_before and prev[1] != label)
        if bad:
            return i
    if scheme == "BIOES" and sequence and _parts(sequence[-1])[0] in ("B", "I"):
        return len(sequence) - 1
    return None


def close_window_edges(sequence: list[str], scheme: str, cut_before: bool, cut_after: bool) -> list[str]:
    """Re-tag an entity cut by a window edge so the window's tags are well formed.

    A training window that starts inside ``B-ORG I-ORG I-ORG`` sees ``I-ORG``
    first, which the scheme forbids at a start; the visible part is tagged as
    an entity of its own instead.
    """
    out = list(sequence)
    if out and cut_before:
        prefix, label = _parts(out[0])
        if prefix == "I":
            out[0] = f"B-{label}"
        elif prefix == "E":
            out[0] = f"S-{label}"
    if out and cut_after and scheme == "BIOES":
        prefix, label = _parts(out[-1])
        if prefix == "B":
            out[-1] = f"S-{label}"
        elif prefix == "I":
            out[-1] = f"E-{label}"
    return out
