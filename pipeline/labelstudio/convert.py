"""Label Studio export -> CoNLL sentences with exact character offsets.

Nothing is lost silently: every span that is not kept as it was annotated
(dropped, trimmed, re-anchored) is counted and listed in the report with its
task id, annotation id, offsets and reason; every task left out is listed
with the field at fault.

What stops, what is skipped: a file that cannot be read as a list of tasks
(not UTF-8, not JSON, nested too deeply, an item that is not a task or has
no usable id) stops the conversion, as does an export where no span result
matches the label config. A task whose own content is broken (``TaskError``:
a null annotation, a result that is not a list, offsets outside its text, a
``value.text`` that is not a string, a lone surrogate in its text) is left
stops it in one line naming the task and field (``convert.bad_tasks: error``,
the default), or is left out and listed in the report (``skip``).
"""

from __future__ import annotations

import bisect
import hashlib
import html
import json
import logging
import multiprocessing
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_dir, atomic_open, write_json
from pipeline.core.conll import Sentence, format_sentence
from pipeline.core.errors import ConversionError, TaskError
from pipeline.core.tags import SCHEMES, spans_to_tags, tag_names
from pipeline.core.words import split_at, split_words
from pipeline.labelstudio.jsonstream import RangeMismatch, find_item_start, first_item_start, iter_json_array
from pipeline.labelstudio.labelconfig import LabelConfig, read_label_config

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
NEARBY_CHARS = 32
SHOWN_SKIPPED = 10  # skipped tasks named in the log; the report lists all of them
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_OTHER_TARGET = ("other_control", "other_object", "unsupported_type")  # span results not for our control/text
_UNMATCHED = _OTHER_TARGET + ("unknown_label",)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    label: str
    annotation_id: Any = None


@dataclass
class ConvertReport:
    """Counts per policy and label, every span that was changed or dropped, and every task skipped."""

    counts: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    spans: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def record(self, reason: str, action: str, task_id: Any, span: Span, text: str, **extra: Any) -> None:
        self.counts[f"spans_{action}:{reason}"] += 1
        self.spans.append({
            "task_id": task_id, "annotation_id": span.annotation_id, "start": span.start,
            "end": span.end, "text": text, "label": span.label, "action": action,
            "reason": reason, **extra,
        })

    def skip(self, error: TaskError) -> None:
        self.counts["tasks_skipped"] += 1
        self.skipped.append({"task_id": error.task_id, "field": error.field, "error": str(error)})

    def merge(self, other: ConvertReport) -> None:
        self.counts.update(other.counts)
        self.labels.update(other.labels)
        self.splits.update(other.splits)
        self.spans.extend(other.spans)
        self.skipped.extend(other.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "labels": dict(sorted(self.labels.items())),
            "splits": dict(self.splits),
            "spans": self.spans,
            "skipped_tasks": self.skipped,
        }


def write_report(path: str | Path, report: ConvertReport) -> None:
    """The report as UTF-8 JSON; a lone surrogate copied from the export is written as its JSON escape."""
    data = json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n"
    with atomic_open(path, "wb") as fh:
        fh.write(data.encode("utf-8", "backslashreplace"))


def iter_export(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream the tasks of a Label Studio JSON export file (gzip-compressed too)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: export file not found")
    yield from iter_json_array(path)


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in ((str, "a string"), (int, "a number"), (float, "a number"), (list, "a list"),
                       (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def task_text(task: dict[str, Any], data_key: str) -> str:
    task_id = task.get("id")
    data = task.get("data")
    if not isinstance(data, dict) or data_key not in data:
        raise TaskError("task has no text", task_id=task_id, field=f"data.{data_key}")
    text = data[data_key]
    if not isinstance(text, str):
        raise TaskError(f"expected a string, got {json_kind(text)}", task_id=task_id, field=f"data.{data_key}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TaskError(f"the text holds a lone surrogate (\\u{ord(text[exc.start]):04x}) at index {exc.start},"
                            " which is no character (a broken emoji?)", task_id=task_id,
                            field=f"data.{data_key}") from None
    return text


def check_task_id(task: Any, number: int) -> Any:
    """The id of the ``number``-th item, which must be a task object with an int or one-line string id."""
    if not isinstance(task, dict):
        raise ConversionError(f"item {number} of the export is {json_kind(task)}, not a task object")
    task_id = task.get("id")
    if task_id is None:
        raise ConversionError(f"item {number} of the export has no task id", field="id")
    if isinstance(task_id, bool) or not isinstance(task_id, (int, str)) or (
            isinstance(task_id, str) and (not task_id.strip() or _LONE_SURROGATE.search(task_id)
                                          or "\n" in task_id or "\r" in task_id)):
        raise ConversionError(f"item {number} of the export has task id {task_id!r}; expected an integer "
                              "or a one-line string", field="id")
    return task_id


def choose_annotations(task: dict[str, Any], policy: str, report: ConvertReport) -> list[dict[str, Any]]:
    """Pick the annotations a task contributes: ground truth, else the latest, or all."""
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise TaskError(f"expected a list, got {json_kind(annotations)}", task_id=task.get("id"),
                        field="annotations")
    kept = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise TaskError(f"expected an annotation object, got {json_kind(ann)}", task_id=task.get("id"),
                            field=f"annotations[{i}]")
        if ann.get("was_cancelled"):
            report.counts["annotations_cancelled"] += 1
        else:
            kept.append(ann)
    if not kept:
        return []
    if policy == "all":
        report.counts["annotations_used"] += len(kept)
        return kept
    if policy != "ground_truth_or_latest":
        raise ConversionError(f"unknown annotation policy {policy!r}", field="convert.annotations")
    truth = [a for a in kept if a.get("ground_truth")]
    pool = truth or kept
    chosen = max(pool, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("id"))))
    report.counts["annotations_used"] += 1
    report.counts["annotations_not_chosen"] += len(kept) - 1
    return [chosen]


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


def tag_sentence(task_id: Any, text: str, spans: list[Span], scheme: str, report: ConvertReport) -> Sentence:
    """Cut ``text`` into words that never cross a span edge and tag them."""
    words = split_at(split_words(text), [p for s in spans for p in (s.start, s.end)])
    starts = [w[0] for w in words]
    ends = [w[1] for w in words]
    word_spans = []
    for span in spans:
        first = bisect.bisect_left(starts, span.start)  # first word starting inside the span
        last = bisect.bisect_right(ends, span.end)      # words ending inside the span
        if first >= last or starts[first] >= span.end:
            report.record("no_words", "dropped", task_id, span, text[span.start:span.end])
            continue
        word_spans.append((first, last, span.label))
        report.labels[span.label] += 1
    return Sentence(str(task_id), text, words, spans_to_tags(len(words), word_spans, scheme))


def split_of(key: str, dev: float, test: float) -> str:
    """Assign a split from a hash, so a task keeps its side when the export grows."""
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test:
        return "test"
    if bucket < test + dev:
        return "dev"
    return "train"


class TaskConverter:
    """Converts tasks one at a time, so an export of any size streams through.

    Holds the policies, the report, and what is needed to spot duplicate
    texts and ids (hashes only, to keep memory flat).
    """

    def __init__(self, config: LabelConfig, *, scheme: str = "BIO", overlap: str = "longest",
                 annotations: str = "ground_truth_or_latest", unknown_label: str = "error",
                 bad_tasks: str = "error", split_key: str = "text", dev: float = 0.1, test: float = 0.1) -> None:
        if scheme not in SCHEMES:
            raise ConversionError(f"unknown tag scheme {scheme!r}; use one of {SCHEMES}", field="convert.scheme")
        if split_key not in ("text", "task_id"):
            raise ConversionError(f"unknown split key {split_key!r}; use 'text' or 'task_id'",
                                  field="convert.split.key")
        if overlap not in ("longest", "error"):
            raise ConversionError(f"unknown overlap policy {overlap!r}; use 'longest' or 'error'",
                                  field="convert.overlap")
        for key, value in (("unknown_label", unknown_label), ("bad_tasks", bad_tasks)):
            choices = ("error", "ignore") if key == "unknown_label" else ("skip", "error")
            if value not in choices:
                raise ConversionError(f"unknown policy {value!r}; use {' or '.join(map(repr, choices))}",
                                      field=f"convert.{key}")
        self.config = config
        self.scheme, self.overlap, self.annotations, self.unknown_label = scheme, overlap, annotations, unknown_label
        self.bad_tasks = bad_tasks
        self.split_key, self.dev, self.test = split_key, dev, test
        self.report = ConvertReport()
        # (task id, text digest, tags hash) per converted task, in export order: duplicates are
        # found once at the end, so ranges converted in parallel give the same report
        self.records: list[tuple[Any, bytes, int]] = []

    def convert(self, task: dict[str, Any]) -> tuple[str, Sentence] | None:
        """``(split, sentence)`` for a task with a usable annotation, else None (counted, or listed if skipped)."""
        report = self.report
        report.counts["tasks"] += 1
        check_task_id(task, report.counts["tasks"])
        counts, listed = dict(report.counts), len(report.spans)  # dict(): a tenth of Counter.copy()'s time
        try:
            return self._convert(task)
        except TaskError as exc:
            if self.bad_tasks == "error":
                raise
            report.counts, report.spans[listed:] = Counter(counts), []  # forget what its first spans recorded
            report.skip(exc)
            return None

    def _convert(self, task: dict[str, Any]) -> tuple[str, Sentence] | None:
        report, task_id = self.report, task["id"]
        text = task_text(task, self.config.data_key)
        chosen = choose_annotations(task, self.annotations, report)
        if not chosen:
            report.counts["tasks_unlabeled"] += 1
            return None
        spans = [s for ann in chosen
                 for s in extract_spans(task, ann, text, self.config, self.unknown_label, report)]
        spans = resolve_overlaps(spans, self.overlap, task_id, text, report)
        sentence = tag_sentence(task_id, text, spans, self.scheme, report)
        if not sentence.words:
            report.counts["tasks_empty_text"] += 1
            return None
        self.records.append((task_id, hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(),
                             hash(tuple(sentence.tags))))
        name = split_of(text if self.split_key == "text" else str(task_id), self.dev, self.test)
        report.splits[name] += 1
        return name, sentence

    def finish(self) -> ConvertReport:
        return finish_report(self.report, self.records, self.config)


def finish_report(report: ConvertReport, records: Iterable[tuple[Any, bytes, int]],
                  config: LabelConfig) -> ConvertReport:
    """Close a conversion (one pass or merged ranges): refuse an unusable export, then find duplicates."""
    check_usable(report, config)
    report_duplicates(records, report)
    return report


def check_usable(report: ConvertReport, config: LabelConfig) -> None:
    """Stop on an export that would train a model on nothing: no tasks, no task converted while
    some were skipped as broken, or span results none of which is for the config's control, text
    and labels."""
    counts = report.counts
    if counts["tasks"] == 0:
        raise ConversionError("the export holds no tasks")
    if report.skipped and not sum(report.splits.values()):
        raise ConversionError(f"no task could be converted: {len(report.skipped)} skipped as broken, the first "
                              f"{report.skipped[0]['error']}")
    unmatched = sum(counts[f"spans_dropped:{reason}"] for reason in _UNMATCHED)
    if unmatched and not counts["spans_matching_config"]:
        raise ConversionError(f"none of the {unmatched} span results matches the label config (<Labels name="
                              f"{config.from_name!r} toName={config.to_name!r}> with labels {list(config.labels)}): "
                              f"{_what_they_name(report)}. Was the control renamed? Convert with the project's "
                              "current label config (python -m pipeline pull), or fix the config")


def _what_they_name(report: ConvertReport) -> str:
    named = Counter((s.get("from_name"), s.get("to_name"), s.get("type")) for s in report.spans
                    if s.get("reason") in _OTHER_TARGET)
    if not named:
        return "every label is one the config does not define (convert.unknown_label: ignore dropped them all)"
    return "they name " + "; ".join(f"from_name={f!r} to_name={t!r} type={k!r} ({n})"
                                    for (f, t, k), n in named.most_common(3))


def write_labels(conll_dir: Path, config: LabelConfig, scheme: str) -> None:
    """``labels.json``: the tag set training uses, taken from the label config (not only tags seen)."""
    write_json(conll_dir / "labels.json", {"scheme": scheme, "entity_types": list(config.labels),
                                           "tags": tag_names(list(config.labels), scheme)})


def report_duplicates(records: Iterable[tuple[Any, bytes, int]], report: ConvertReport) -> None:
    """Count repeated texts and ids; list texts whose labels differ from the first occurrence, and
    every repeated task id (the CoNLL files would hold two sentences under one id)."""
    first: dict[bytes, tuple[Any, int]] = {}
    texts_by_id: dict[str, tuple[Any, bytes]] = {}
    for task_id, digest, tags_hash in records:
        earlier = texts_by_id.get(str(task_id))
        if earlier is None:
            texts_by_id[str(task_id)] = (task_id, digest)
        else:
            report.counts["tasks_duplicate_id"] += 1
            report.spans.append({"task_id": task_id, "action": "reported",
                                 "reason": "duplicate_id" if earlier[1] == digest else "duplicate_id_different_text",
                                 "duplicate_of": earlier[0]})
        seen = first.get(digest)
        if seen is None:
            first[digest] = (task_id, tags_hash)
            continue
        report.counts["tasks_duplicate_text"] += 1
        if seen[1] != tags_hash:
            report.counts["tasks_duplicate_conflicting_labels"] += 1
            report.spans.append({"task_id": task_id, "action": "reported", "reason": "duplicate_conflict",
                                 "duplicate_of": seen[0]})


def convert_tasks(tasks: Iterable[dict[str, Any]], config: LabelConfig,
                  **options: Any) -> tuple[dict[str, list[Sentence]], ConvertReport]:
    """Convert tasks held in memory (tests, small exports) into train/dev/test sentences."""
    converter = TaskConverter(config, **options)
    splits: dict[str, list[Sentence]] = {name: [] for name in SPLITS}
    for task in tasks:
        converted = converter.convert(task)
        if converted is not None:
            splits[converted[0]].append(converted[1])
    return splits, converter.finish()


def log_summary(report: ConvertReport, report_path: str | Path | None = None) -> None:
    rows = [("tasks", report.counts["tasks"]), ("unlabeled (left for predict)", report.counts["tasks_unlabeled"]),
            ("skipped as broken", report.counts["tasks_skipped"])]
    rows += [(f"split {k}", v) for k, v in report.splits.items()]
    rows += [(k, v) for k, v in sorted(report.counts.items()) if k.startswith(("spans_", "annotations_", "results_"))]
    rows += [(f"label {k}", v) for k, v in sorted(report.labels.items())]
    width = max(len(k) for k, _ in rows)
    log.info("conversion summary\n%s", "\n".join(f"  {k:<{width}}  {v:>7}" for k, v in rows))
    for entry in report.skipped[:SHOWN_SKIPPED]:
        log.warning("skipped %s", entry["error"])
    if report.skipped:
        more = len(report.skipped) - SHOWN_SKIPPED
        log.warning("%s%d broken tasks skipped; all are listed under skipped_tasks in %s (convert.bad_tasks: error "
                    "stops at the first)", f"{more} more, " if more > 0 else "", len(report.skipped),
                    report_path or "the report")


PARALLEL_MIN_BYTES = 8 << 20  # below this, starting processes costs more than it saves


def run(export_path: str | Path, label_config_path: str | Path, conll_dir: str | Path,
        report_path: str | Path, *, tasks: Iterable[dict[str, Any]] | None = None, workers: int = 1,
        parallel_min_bytes: int = PARALLEL_MIN_BYTES, **options: Any) -> ConvertReport:
    """Stream an export into CoNLL files; the output folder is swapped in only when all of it converted.

    Large export files are cut into byte ranges converted by ``workers``
    processes; the output is the same as from one process.
    """
    config = read_label_config(label_config_path)
    scheme = options.get("scheme", "BIO")
    TaskConverter(config, **options)  # check the options before any work
    workers = workers or os.cpu_count() or 1
    with atomic_dir(conll_dir) as out:
        report = None
        if tasks is None and workers > 1 and Path(export_path).stat().st_size >= parallel_min_bytes:
            report = _convert_in_ranges(Path(export_path), config, options, out, workers)
        if report is None:
            report = _convert_stream(tasks if tasks is not None else iter_export(export_path), config, options, out)
        write_labels(out, config, scheme)
    write_report(report_path, report)
    log_summary(report, report_path)
    return report


def _convert_stream(tasks: Iterable[dict[str, Any]], config: LabelConfig, options: dict[str, Any],
                    out: Path) -> ConvertReport:
    return _convert_into(tasks, config, options, out, prefix="").finish()


def _convert_into(tasks: Iterable[dict[str, Any]], config: LabelConfig, options: dict[str, Any], out: Path,
                  prefix: str) -> TaskConverter:
    converter = TaskConverter(config, **options)
    with ExitStack() as stack:
        files = {name: stack.enter_context((out / f"{prefix}{name}.conll").open("w", encoding="utf-8"))
                 for name in SPLITS}
        for task in tasks:
            converted = converter.convert(task)
            if converted is not None:
                files[converted[0]].write(format_sentence(converted[1]))
    return converter


def _convert_range(export_path: Path, config: LabelConfig, options: dict[str, Any], out: Path, k: int,
                   start: int, stop: int | None) -> tuple[ConvertReport, list]:
    converter = _convert_into(iter_json_array(export_path, start=start, stop=stop), config, options, out,
                              prefix=f".part{k}.")
    return converter.report, converter.records


def _convert_in_ranges(export_path: Path, config: LabelConfig, options: dict[str, Any], out: Path,
                       workers: int) -> ConvertReport | None:
    """Convert byte ranges side by side; None means "do it in one pass" (odd file, or an error to report)."""
    first = first_item_start(export_path)
    if first is None:
        return None
    size = export_path.stat().st_size
    starts = [first]
    for k in range(1, workers):
        guess = find_item_start(export_path, first + (size - first) * k // workers)
        if guess is None or guess <= starts[-1]:
            break
        starts.append(guess)
    if len(starts) < 2:
        return None
    ranges = list(zip(starts, starts[1:] + [None]))
    with multiprocessing.get_context("fork").Pool(len(ranges)) as pool:
        jobs = [pool.apply_async(_convert_range, (export_path, config, options, out, k, start, stop))
                for k, (start, stop) in enumerate(ranges)]
        try:
            results = [job.get() for job in jobs]
        except (RangeMismatch, ConversionError) as exc:
            log.info("parallel conversion gave up (%s); converting in one pass", exc)
            for part in out.glob(".part*"):
                part.unlink()
            return None
    report = ConvertReport()
    records: list = []
    for part_report, part_records in results:
        report.merge(part_report)
        records.extend(part_records)
    for name in SPLITS:
        with (out / f"{name}.conll").open("wb") as target:
            for k in range(len(ranges)):
                part = out / f".part{k}.{name}.conll"
                with part.open("rb") as source:
                    shutil.copyfileobj(source, target, 1 << 20)
                part.unlink()
    finish_report(report, records, config)
    log.info("converted %d tasks in %d parallel ranges", report.counts["tasks"], len(ranges))
    return report
