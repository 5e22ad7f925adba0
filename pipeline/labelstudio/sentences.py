"""Tasks -> tagged sentences, one task at a time: ``TaskConverter`` applies the ``convert.*`` policies, tags
words that never cross a span edge and assigns each task its split; finishing a conversion refuses an unusable
export and reports duplicate texts and ids.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Iterable
from typing import Any

from pipeline.core.config import ConvertConfig
from pipeline.core.conll import Sentence
from pipeline.core.errors import ConversionError, TaskError
from pipeline.core.tags import spans_to_tags
from pipeline.core.words import split_at, split_words
from pipeline.labelstudio.duplicates import TaskRecords, report_duplicates
from pipeline.labelstudio.labelconfig import LabelConfig
from pipeline.labelstudio.report import ConvertReport, Span
from pipeline.labelstudio.spans import OTHER_TARGET, UNMATCHED, extract_spans, resolve_overlaps
from pipeline.labelstudio.tasks import check_task_id, choose_annotations, task_text

SPLITS = ("train", "dev", "test")


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

    Holds the ``convert.*`` policies (a validated ``ConvertConfig``), the report, and what is needed
    to spot duplicate texts and ids (hashes only, to keep memory flat).
    """

    def __init__(self, config: LabelConfig, policies: ConvertConfig | None = None) -> None:
        self.config = config
        self.policies = ConvertConfig() if policies is None else policies  # its types checked every choice
        self.report = ConvertReport()
        # (task id, text digest, tags hash) per converted task, in export order, ~32 bytes each: duplicates
        # are found once at the end, so ranges converted in parallel give the same report
        self.records = TaskRecords()

    def convert(self, task: dict[str, Any]) -> tuple[str, Sentence] | None:
        """``(split, sentence)`` for a task with a usable annotation, else None (counted, or listed if skipped)."""
        report = self.report
        report.counts["tasks"] += 1
        check_task_id(task, report.counts["tasks"])
        counts, listed = dict(report.counts), len(report.spans)  # dict(): a tenth of Counter.copy()'s time
        try:
            return self._convert(task)
        except TaskError as exc:
            if self.policies.bad_tasks == "error":
                raise
            report.counts, report.spans[listed:] = Counter(counts), []  # forget what its first spans recorded
            report.skip(exc)
            return None

    def _convert(self, task: dict[str, Any]) -> tuple[str, Sentence] | None:
        report, task_id, policies = self.report, task["id"], self.policies
        text = task_text(task, self.config.data_key)
        chosen = choose_annotations(task, policies.annotations, report)
        if not chosen:
            report.counts["tasks_unlabeled"] += 1
            return None
        spans = [s for ann in chosen
                 for s in extract_spans(task, ann, text, self.config, policies.unknown_label, report)]
        spans = resolve_overlaps(spans, policies.overlap, task_id, text, report)
        sentence = tag_sentence(task_id, text, spans, policies.scheme, report)
        if not sentence.words:
            report.counts["tasks_empty_text"] += 1
            return None
        self.records.add(task_id, text, tuple(sentence.tags))
        split = policies.split
        name = split_of(text if split.key == "text" else str(task_id), split.dev, split.test)
        report.splits[name] += 1
        return name, sentence

    def finish(self) -> ConvertReport:
        return finish_report(self.report, self.records, self.config)


def finish_report(report: ConvertReport, records: TaskRecords, config: LabelConfig) -> ConvertReport:
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
    unmatched = sum(counts[f"spans_dropped:{reason}"] for reason in UNMATCHED)
    if unmatched and not counts["spans_matching_config"]:
        raise ConversionError(f"none of the {unmatched} span results matches the label config (<Labels name="
                              f"{config.from_name!r} toName={config.to_name!r}> with labels {list(config.labels)}): "
                              f"{_what_they_name(report)}. Was the control renamed? Convert with the project's "
                              "current label config (python -m pipeline pull), or fix the config")


def _what_they_name(report: ConvertReport) -> str:
    named = Counter((s.get("from_name"), s.get("to_name"), s.get("type")) for s in report.spans
                    if s.get("reason") in OTHER_TARGET)
    if not named:
        return "every label is one the config does not define (convert.unknown_label: ignore dropped them all)"
    return "they name " + "; ".join(f"from_name={f!r} to_name={t!r} type={k!r} ({n})"
                                    for (f, t, k), n in named.most_common(3))


def convert_tasks(tasks: Iterable[dict[str, Any]], config: LabelConfig, *,
                  policies: ConvertConfig | None = None) -> tuple[dict[str, list[Sentence]], ConvertReport]:
    """Convert tasks held in memory (tests, small exports) into train/dev/test sentences."""
    converter = TaskConverter(config, policies)
    splits: dict[str, list[Sentence]] = {name: [] for name in SPLITS}
    for task in tasks:
        converted = converter.convert(task)
        if converted is not None:
            splits[converted[0]].append(converted[1])
    return splits, converter.finish()
