"""One annotation's results -> the character spans it labels, each checked against the task's text.

Routing (is a result a span of the config's control and text?), reading ``value`` (offsets, labels,
``value.text``), anchoring (UTF-16 offsets, shifted spans, known Label Studio quirks), trimming edge whitespace,
and resolving overlaps. Every span not kept as annotated is recorded in the report.
"""

from __future__ import annotations

import html
from typing import Any

from pipeline.core.errors import ConversionError, TaskError
from pipeline.labelstudio.labelconfig import LabelConfig
from pipeline.labelstudio.report import ConvertReport, Span
from pipeline.labelstudio.tasks import json_kind

NEARBY_CHARS = 32
OTHER_TARGET = ("other_control", "other_object", "unsupported_type")  # span results not for our control/text
UNMATCHED = OTHER_TARGET + ("unknown_label",)


def result_route(item: dict[str, Any], config: LabelConfig) -> str:
    """``span`` for a span of the config's control, ``other`` for a non-span result (choices, text
    areas, relations), else why a span result is not ours: ``other_control``, ``other_object``, or
    ``unsupported_type`` (``hypertextlabels`` and the like, whose offsets are not into plain text)."""
    kind = item.get("type")
    if not (isinstance(kind, str) and kind.endswith("labels")):
        return "other"
    if item.get("from_name") != config.from_name:
        return "other_control"
    if item.get("to_name") != config.to_name:
        return "other_object"
    return "span" if kind == "labels" else "unsupported_type"


def results_of(annotation: dict[str, Any], task_id: Any, where: str) -> list[Any]:
    """An annotation's result list (null or missing: none)."""
    results = annotation.get("result")
    if results is None:
        return []
    if not isinstance(results, list):
        raise TaskError(f"expected a list of results, got {json_kind(results)}", task_id=task_id,
                        field=f"{where}.result")
    return results


def list_unmatched(reason: str, item: dict[str, Any], task_id: Any, annotation_id: Any,
                   report: ConvertReport) -> None:
    """List a span result that is not for the config's control and text, with what it names."""
    value = item.get("value") if isinstance(item.get("value"), dict) else {}
    labels = value.get("labels")
    report.counts[f"spans_dropped:{reason}"] += 1
    report.spans.append({
        "task_id": task_id, "annotation_id": annotation_id, "start": value.get("start"),
        "end": value.get("end"), "text": value.get("text"),
        "label": "|".join(map(str, labels)) if isinstance(labels, list) else labels,
        "action": "dropped", "reason": reason, "type": item.get("type"),
        "from_name": item.get("from_name"), "to_name": item.get("to_name"),
    })


def read_value(item: dict[str, Any], text: str, task_id: Any, where: str) -> tuple[int, int, list, str | None]:
    """``(start, end, labels, value.text)`` of a span result, checked against the text."""
    value = item.get("value")
    if not isinstance(value, dict):
        raise TaskError(f"expected a 'value' object, got {json_kind(value)}", task_id=task_id, field=where)
    start, end = value.get("start"), value.get("end")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
        raise TaskError(f"start/end must be integers, got {start!r}/{end!r}", task_id=task_id,
                        field=f"{where}.value")
    if start < 0 or end <= start:
        raise TaskError(f"offsets {start}..{end} are negative or reversed", task_id=task_id,
                        field=f"{where}.value")
    if end > len(text) and end > _utf16_len(text):
        raise TaskError(f"offsets {start}..{end} lie outside the text (length {len(text)})",
                        task_id=task_id, field=f"{where}.value")
    value_text, labels = value.get("text"), value.get("labels")
    if value_text is not None and not isinstance(value_text, str):
        raise TaskError(f"expected a string, got {json_kind(value_text)}", task_id=task_id,
                        field=f"{where}.value.text")
    if labels is not None and not isinstance(labels, list):
        raise TaskError(f"expected a list of label names, got {json_kind(labels)}", task_id=task_id,
                        field=f"{where}.value.labels")
    return start, end, labels or [], value_text


def extract_spans(task: dict[str, Any], annotation: dict[str, Any], text: str, config: LabelConfig,
                  unknown_label: str, report: ConvertReport) -> list[Span]:
    task_id, annotation_id = task.get("id"), annotation.get("id")
    where = f"annotations[id={annotation_id}]"
    spans = []
    for j, item in enumerate(results_of(annotation, task_id, where)):
        if not isinstance(item, dict):
            raise TaskError(f"expected a result object, got {json_kind(item)}", task_id=task_id,
                            field=f"{where}.result[{j}]")
        route = result_route(item, config)
        if route == "other":
            report.counts[f"results_ignored:{item.get('type', 'unknown')}"] += 1
            continue
        if route != "span":
            list_unmatched(route, item, task_id, annotation_id, report)
            continue
        start, end, labels, value_text = read_value(item, text, task_id, f"{where}.result[{j}]")
        if len(labels) != 1:
            span = Span(start, end, "|".join(map(str, labels)), annotation_id)
            report.record("not_one_label", "dropped", task_id, span, text[start:end])
            continue
        label = labels[0]
        if label not in config.labels:
            if unknown_label == "ignore":
                report.record("unknown_label", "dropped", task_id, Span(start, end, label, annotation_id),
                              text[start:end])
                continue
            raise ConversionError(f"label {label!r} is not in the label config {list(config.labels)}",
                                  task_id=task_id, field=f"{where}.result[{j}].value.labels")
        report.counts["spans_matching_config"] += 1
        span = anchor_span(text, Span(start, end, label, annotation_id), value_text, task_id, report)
        if span is not None:
            span = trim_whitespace(text, span, task_id, report)
        if span is not None:
            spans.append(span)
    return spans


def _utf16_to_index(text: str, unit: int) -> int | None:
    """Code-point index of a UTF-16 code-unit offset, or None if it splits a pair."""
    units = 0
    for i, ch in enumerate(text):
        if units == unit:
            return i
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > unit:
            return None
    return len(text) if units == unit else None


def _utf16_len(text: str) -> int:
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def text_disagreement(found: str, value_text: str) -> str | None:
    """Which known Label Studio quirk makes ``value.text`` differ from a right ``text[start:end]``, or None.

    - ``whitespace_normalised``: runs of spaces or line breaks (``\\r\\n`` too) collapsed to one space,
      or edge whitespace trimmed (HumanSignal/label-studio#3078, #5338)
    - ``line_breaks_removed``: line breaks dropped after the annotation was updated (#1863)
    - ``html_escaped``: ``&amp;`` for ``&`` and the like ("escaped characters", #4929)
    - ``word_granularity``: the raw selection, while the offsets were widened to whole words (#1931)
    """
    if not value_text.strip() or not found.strip():
        return None
    if " ".join(found.split()) == " ".join(value_text.split()):
        return "whitespace_normalised"
    if "".join(found.split()) == "".join(value_text.split()):
        return "line_breaks_removed"
    if html.unescape(value_text) == found:
        return "html_escaped"
    k = found.find(value_text)
    if k != -1:
        before, after = found[:k], found[k + len(value_text):]
        if (not before or before.isalnum()) and (not after or after.isalnum()):
            return "word_granularity"
    return None


def anchor_span(text: str, span: Span, value_text: str | None, task_id: Any,
                report: ConvertReport) -> Span | None:
    """Make ``span`` point at exactly ``value_text`` in ``text``, or drop it.

    Label Studio writes code-point offsets, but some tools and older exports
    count UTF-16 units (shifted by one per emoji before the span), and edited
    texts move spans a few characters: both are repaired and listed. Where
    ``value.text`` differs in a known way (``text_disagreement``) the offsets
    are kept and the class counted.
    """
    found = text[span.start:span.end]
    if value_text is None or found == value_text:
        if value_text is None:
            report.counts["spans_accepted:no_value_text"] += 1
        return span
    start, end = _utf16_to_index(text, span.start), _utf16_to_index(text, span.end)
    if start is not None and end is not None and text[start:end] == value_text:
        fixed = Span(start, end, span.label, span.annotation_id)
        report.record("utf16_offsets", "changed", task_id, span, value_text, new_start=start, new_end=end)
        return fixed
    quirk = text_disagreement(found, value_text)
    if quirk is not None:
        report.counts[f"spans_accepted:{quirk}"] += 1
        return span
    best = _nearest(text, value_text, span.start, max(0, span.start - NEARBY_CHARS),
                    min(len(text), span.end + NEARBY_CHARS))
    if best is not None:
        fixed = Span(best, best + len(value_text), span.label, span.annotation_id)
        report.record("shifted", "changed", task_id, span, value_text, new_start=fixed.start, new_end=fixed.end)
        return fixed
    report.record("text_mismatch", "dropped", task_id, span, value_text, found=found)
    return None


def _nearest(text: str, needle: str, origin: int, lo: int, hi: int) -> int | None:
    """Start of the occurrence of ``needle`` in ``text[lo:hi]`` nearest to ``origin``."""
    best = None
    pos = text.find(needle, lo, hi) if needle else -1
    while pos != -1:
        if best is None or abs(pos - origin) < abs(best - origin):
            best = pos
        pos = text.find(needle, pos + 1, hi)
    return best


def trim_whitespace(text: str, span: Span, task_id: Any, report: ConvertReport) -> Span | None:
    """The span without whitespace at its edges (listed), or None (listed) if nothing else is left."""
    raw = text[span.start:span.end]
    stripped = raw.strip()
    if not stripped:
        report.record("whitespace_only", "dropped", task_id, span, raw)
        return None
    if stripped == raw:
        return span
    new_start = span.start + (len(raw) - len(raw.lstrip()))
    trimmed = Span(new_start, new_start + len(stripped), span.label, span.annotation_id)
    report.record("trimmed_whitespace", "changed", task_id, span, raw, new_start=trimmed.start, new_end=trimmed.end)
    return trimmed


def resolve_overlaps(spans: list[Span], policy: str, task_id: Any, text: str, report: ConvertReport) -> list[Span]:
    """Keep the longest of overlapping spans (ties: earliest start), or refuse them."""
    ordered = sorted(set(spans), key=lambda s: (-(s.end - s.start), s.start, s.label))
    kept: list[Span] = []
    for span in ordered:
        clash = next((k for k in kept if span.start < k.end and k.start < span.end), None)
        if clash is None:
            kept.append(span)
            continue
        if policy == "error":
            raise ConversionError(f"span {span.start}..{span.end} ({span.label}) overlaps "
                                  f"{clash.start}..{clash.end} ({clash.label})", task_id=task_id)
        reason = "duplicate" if (clash.start, clash.end) == (span.start, span.end) else "overlap"
        report.record(reason, "dropped", task_id, span, text[span.start:span.end],
                      kept_start=clash.start, kept_end=clash.end, kept_label=clash.label)
    removed_dupes = len(spans) - len(set(spans))
    if removed_dupes:
        report.counts["spans_identical_merged"] += removed_dupes
    return sorted(kept, key=lambda s: s.start)
