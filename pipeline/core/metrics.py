"""Scores of tagged sentences, torch-free: seqeval precision/recall/F1 (lenient and strict), per type, and every
wrong or missed span with its task, text and context (``reports/errors.jsonl``) and the entity confusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from seqeval.metrics import classification_report
from seqeval.scheme import IOB2, IOBES

from pipeline.core.conll import Sentence
from pipeline.core.tags import tags_to_spans


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    return {
        "precision": micro["precision"],
        "recall": micro["recall"],
        "f1": micro["f1-score"],
        "macro_f1": report.get("macro avg", {}).get("f1-score", 0.0),
        "per_type": {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                         "support": int(v["support"])}
                     for k, v in report.items() if not k.endswith(" avg")},
    }


def score(gold: list[list[str]], pred: list[list[str]], scheme: str) -> dict[str, Any]:
    """Micro/macro precision, recall, F1 and per-type figures, lenient (conlleval) and strict.

    The top-level figures are seqeval's default (conlleval-compatible, what
    papers on this corpus report); ``strict`` only counts entities whose tags
    are well formed in the scheme, which is what an exact span match needs.
    """
    lenient = _figures(classification_report(gold, pred, output_dict=True, zero_division=0))
    strict = _figures(classification_report(gold, pred, output_dict=True, zero_division=0, mode="strict",
                                             scheme=IOBES if scheme == "BIOES" else IOB2))
    return {**lenient, "strict_f1": strict["f1"], "strict": strict, "sentences": len(gold)}


def _char_span(sentence: Sentence, span: tuple[int, int, str]) -> dict[str, Any]:
    first, last, label = span
    start, end = sentence.words[first][0], sentence.words[last - 1][1]
    return {"start": start, "end": end, "label": label, "text": sentence.text[start:end]}


def _context(sentence: Sentence, start: int, end: int, width: int = 60) -> str:
    text = sentence.text
    lo, hi = max(0, start - width), min(len(text), end + width)
    return f"{'…' if lo else ''}{text[lo:start]}[[{text[start:end]}]]{text[end:hi]}{'…' if hi < len(text) else ''}"


def entity_errors(sentences: Sequence[Sentence], pred: list[list[str]]) -> tuple[list[dict], list[dict]]:
    """Entity-level confusion rows and the list of wrong or missed spans, each with its task.

    Spans match on exact word boundaries. A gold span that only overlaps a
    predicted one is a ``boundary`` error (listed once, with both spans); a
    gold span with no overlapping prediction is ``missed``, a prediction with
    no overlapping gold span ``spurious``, the same span with another label
    ``type``. Confusion rows use ``O`` for "no entity there".
    """
    confusion: list[dict] = []
    errors: list[dict] = []
    for sentence, tags in zip(sentences, pred):
        gold = tags_to_spans(sentence.tags)
        found = tags_to_spans(tags)
        found_at = {(a, b): label for a, b, label in found}
        gold_at = {(a, b): label for a, b, label in gold}
        used: set[tuple[int, int]] = set()
        for g in gold:
            a, b, label = g
            predicted = found_at.get((a, b), "O")
            confusion.append({"actual": label, "predicted": predicted})
            if predicted == label:
                continue
            kind, other = "type", None
            if predicted != "O":
                other = (a, b, predicted)
            else:
                overlapping = [f for f in found if f[0] < b and a < f[1] and (f[0], f[1]) not in gold_at]
                kind, other = ("boundary", overlapping[0]) if overlapping else ("missed", None)
            if other is not None:
                used.add((other[0], other[1]))
            errors.append(_error(sentence, kind, g, other))
        for f in found:
            if (f[0], f[1]) not in gold_at:
                confusion.append({"actual": "O", "predicted": f[2]})
                if (f[0], f[1]) not in used:
                    errors.append(_error(sentence, "spurious", None, f))
    return confusion, errors


def _error(sentence: Sentence, kind: str, gold: tuple | None, predicted: tuple | None) -> dict[str, Any]:
    spans = [_char_span(sentence, s) for s in (gold, predicted) if s is not None]
    start, end = min(s["start"] for s in spans), max(s["end"] for s in spans)
    return {"task_id": sentence.task_id, "kind": kind,
            "gold": _char_span(sentence, gold) if gold else None,
            "predicted": _char_span(sentence, predicted) if predicted else None,
            "context": _context(sentence, start, end)}
