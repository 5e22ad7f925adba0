"""Label Studio export -> CoNLL sentences with exact character offsets.

Nothing is lost silently: every span that is not kept as it was annotated
(dropped, trimmed, re-anchored) is counted and listed in the report with its
task id, annotation id, offsets and reason.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, atomic_open, write_json
from pipeline.conll import Sentence, format_sentence
from pipeline.errors import ConversionError
from pipeline.jsonstream import RangeMismatch, find_item_start, first_item_start, iter_json_array
from pipeline.labelconfig import LabelConfig, read_label_config
from pipeline.tags import SCHEMES, spans_to_tags, tag_names
from pipeline.words import split_at, split_words

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
NEARBY_CHARS = 32


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    label: str
    annotation_id: Any = None


@dataclass
class ConvertReport:
    """Counts per policy and label, plus every span that was changed or dropped."""

    counts: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    spans: list[dict[str, Any]] = field(default_factory=list)

    def record(self, reason: str, action: str, task_id: Any, span: Span, text: str, **extra: Any) -> None:
        self.counts[f"spans_{action}:{reason}"] += 1
        self.spans.append({
            "task_id": task_id, "annotation_id": span.annotation_id, "start": span.start,
            "end": span.end, "text": text, "label": span.label, "action": action,
            "reason": reason, **extra,
        })

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "labels": dict(sorted(self.labels.items())),
            "splits": dict(self.splits),
            "spans": self.spans,
        }


def iter_export(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream the tasks of a Label Studio JSON export file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: export file not found")
    yield from iter_json_array(path)


def task_text(task: dict[str, Any], data_key: str) -> str:
    task_id = task.get("id")
    data = task.get("data")
    if not isinstance(data, dict) or data_key not in data:
        raise ConversionError("task has no text", task_id=task_id, field=f"data.{data_key}")
    text = data[data_key]
    if not isinstance(text, str):
        raise ConversionError(f"expected a string, got {type(text).__name__}", task_id=task_id,
                              field=f"data.{data_key}")
    return text


def choose_annotations(task: dict[str, Any], policy: str, report: ConvertReport) -> list[dict[str, Any]]:
    """Pick the annotations a task contributes: ground truth, else the latest, or all."""
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise ConversionError("expected a list", task_id=task.get("id"), field="annotations")
    kept = []
    for ann in annotations:
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


def anchor_span(text: str, span: Span, value_text: str | None, task_id: Any,
                report: ConvertReport) -> Span | None:
    """Make ``span`` point at exactly ``value_text`` in ``text``, or drop it.

    Label Studio writes code-point offsets, but some tools and older exports
    count UTF-16 units (shifted by one per emoji before the span); and edited
    texts move spans a few characters. Both are repaired and reported.
    """
    if value_text is None or text[span.start:span.end] == value_text:
        return span
    start, end = _utf16_to_index(text, span.start), _utf16_to_index(text, span.end)
    if start is not None and end is not None and text[start:end] == value_text:
        fixed = Span(start, end, span.label, span.annotation_id)
        report.record("utf16_offsets", "changed", task_id, span, value_text, new_start=start, new_end=end)
        return fixed
    lo = max(0, span.start - NEARBY_CHARS)
    hi = min(len(text), span.end + NEARBY_CHARS)
    best = None
    pos = text.find(value_text, lo, hi) if value_text else -1
    while pos != -1:
        if best is None or abs(pos - span.start) < abs(best - span.start):
            best = pos
        pos = text.find(value_text, pos + 1, hi)
    if best is not None:
        fixed = Span(best, best + len(value_text), span.label, span.annotation_id)
        report.record("shifted", "changed", task_id, span, value_text, new_start=fixed.start, new_end=fixed.end)
        return fixed
    report.record("text_mismatch", "dropped", task_id, span, value_text,
                  found=text[span.start:span.end])
    return None


def extract_spans(task: dict[str, Any], annotation: dict[str, Any], text: str, config: LabelConfig,
                  unknown_label: str, report: ConvertReport) -> list[Span]:
    task_id = task.get("id")
    results = annotation.get("result") or []
    spans = []
    for j, item in enumerate(results):
        where = f"annotations[id={annotation.get('id')}].result[{j}]"
        if item.get("type") != "labels" or item.get("from_name") != config.from_name:
            report.counts[f"results_ignored:{item.get('type', 'unknown')}"] += 1
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            raise ConversionError("missing 'value'", task_id=task_id, field=where)
        start, end = value.get("start"), value.get("end")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise ConversionError(f"start/end must be integers, got {start!r}/{end!r}", task_id=task_id,
                                  field=f"{where}.value")
        if start < 0 or end <= start:
            raise ConversionError(f"offsets {start}..{end} are negative or reversed", task_id=task_id,
                                  field=f"{where}.value")
        if end > len(text) and end > _utf16_len(text):
            raise ConversionError(f"offsets {start}..{end} lie outside the text (length {len(text)})",
                                  task_id=task_id, field=f"{where}.value")
        labels = value.get("labels") or []
        if len(labels) != 1:
            span = Span(start, end, "|".join(map(str, labels)), annotation.get("id"))
            report.record("not_one_label", "dropped", task_id, span, text[start:end])
            continue
        label = labels[0]
        if label not in config.labels:
            if unknown_label == "ignore":
                report.record("unknown_label", "dropped", task_id, Span(start, end, label, annotation.get("id")),
                              text[start:end])
                continue
            raise ConversionError(f"label {label!r} is not in the label config {list(config.labels)}",
                                  task_id=task_id, field=f"{where}.value.labels")
        span = anchor_span(text, Span(start, end, label, annotation.get("id")), value.get("text"), task_id, report)
        if span is None:
            continue
        raw = text[span.start:span.end]
        stripped = raw.strip()
        if not stripped:
            report.record("whitespace_only", "dropped", task_id, span, raw)
            continue
        if stripped != raw:
            new_start = span.start + (len(raw) - len(raw.lstrip()))
            trimmed = Span(new_start, new_start + len(stripped), label, span.annotation_id)
            report.record("trimmed_whitespace", "changed", task_id, span, raw,
                          new_start=trimmed.start, new_end=trimmed.end)
            span = trimmed
        spans.append(span)
    return spans


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
    texts (hashes only, to keep memory flat).
    """

    def __init__(self, config: LabelConfig, *, scheme: str = "BIO", overlap: str = "longest",
                 annotations: str = "ground_truth_or_latest", unknown_label: str = "error",
                 split_key: str = "text", dev: float = 0.1, test: float = 0.1) -> None:
        if scheme not in SCHEMES:
            raise ConversionError(f"unknown tag scheme {scheme!r}; use one of {SCHEMES}", field="convert.scheme")
        if split_key not in ("text", "task_id"):
            raise ConversionError(f"unknown split key {split_key!r}; use 'text' or 'task_id'",
                                  field="convert.split.key")
        if overlap not in ("longest", "error"):
            raise ConversionError(f"unknown overlap policy {overlap!r}; use 'longest' or 'error'",
                                  field="convert.overlap")
        if unknown_label not in ("error", "ignore"):
            raise ConversionError(f"unknown policy {unknown_label!r}; use 'error' or 'ignore'",
                                  field="convert.unknown_label")
        self.config = config
        self.scheme, self.overlap, self.annotations, self.unknown_label = scheme, overlap, annotations, unknown_label
        self.split_key, self.dev, self.test = split_key, dev, test
        self.report = ConvertReport()
        # (task id, text digest, tags hash) per converted task, in export order: duplicates are
        # found once at the end, so ranges converted in parallel give the same report
        self.records: list[tuple[Any, bytes, int]] = []

    def convert(self, task: dict[str, Any]) -> tuple[str, Sentence] | None:
        """``(split, sentence)`` for a task with a usable annotation, else None (counted)."""
        report = self.report
        report.counts["tasks"] += 1
        if not isinstance(task, dict):
            raise ConversionError(f"item {report.counts['tasks']} of the export is not a task object")
        task_id = task.get("id")
        if task_id is None:
            raise ConversionError(f"item {report.counts['tasks']} of the export has no task id", field="id")
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
        return finish_report(self.report, self.records)


def finish_report(report: ConvertReport, records: Iterable[tuple[Any, bytes, int]]) -> ConvertReport:
    """Close a conversion (one pass or merged ranges): refuse an empty export, then find duplicates."""
    if report.counts["tasks"] == 0:
        raise ConversionError("the export holds no tasks")
    report_duplicates(records, report)
    return report


def write_labels(conll_dir: Path, config: LabelConfig, scheme: str) -> None:
    """``labels.json``: the tag set training uses, taken from the label config (not only tags seen)."""
    write_json(conll_dir / "labels.json", {"scheme": scheme, "entity_types": list(config.labels),
                                           "tags": tag_names(list(config.labels), scheme)})


def report_duplicates(records: Iterable[tuple[Any, bytes, int]], report: ConvertReport) -> None:
    """Count repeated texts, and list those whose labels differ from the first occurrence."""
    first: dict[bytes, tuple[Any, int]] = {}
    for task_id, digest, tags_hash in records:
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


def log_summary(report: ConvertReport) -> None:
    rows = [("tasks", report.counts["tasks"]), ("unlabeled (left for predict)", report.counts["tasks_unlabeled"])]
    rows += [(f"split {k}", v) for k, v in report.splits.items()]
    rows += [(k, v) for k, v in sorted(report.counts.items()) if k.startswith(("spans_", "annotations_", "results_"))]
    rows += [(f"label {k}", v) for k, v in sorted(report.labels.items())]
    width = max(len(k) for k, _ in rows)
    log.info("conversion summary\n%s", "\n".join(f"  {k:<{width}}  {v:>7}" for k, v in rows))


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
    write_json(report_path, report.to_dict())
    log_summary(report)
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
        report.counts.update(part_report.counts)
        report.labels.update(part_report.labels)
        report.splits.update(part_report.splits)
        report.spans.extend(part_report.spans)
        records.extend(part_records)
    for name in SPLITS:
        with (out / f"{name}.conll").open("wb") as target:
            for k in range(len(ranges)):
                part = out / f".part{k}.{name}.conll"
                with part.open("rb") as source:
                    shutil.copyfileobj(source, target, 1 << 20)
                part.unlink()
    finish_report(report, records)
    log.info("converted %d tasks in %d parallel ranges", report.counts["tasks"], len(ranges))
    return report


def main(params: dict[str, Any], engine: str | None = None, project: int | None = None) -> None:
    """Convert the export file, or (``--project``) a live project's export pulled through the SDK."""
    paths, conf = params["paths"], params["convert"]
    engine = engine or conf.get("engine", "exact")
    options = dict(scheme=conf["scheme"], overlap=conf["overlap"], annotations=conf["annotations"],
                   unknown_label=conf["unknown_label"], split_key=conf["split"]["key"],
                   dev=conf["split"]["dev"], test=conf["split"]["test"])
    if engine == "exact":
        options["workers"] = conf.get("workers", 0)
        convert_file = run
    elif engine == "ls-converter":
        from pipeline.ls_converter import run as convert_file
    else:
        raise ConversionError(f"unknown engine {engine!r}; use 'exact' or 'ls-converter'", field="convert.engine")
    if project is None:
        convert_file(paths["export"], paths["label_config"], paths["conll_dir"], paths["convert_report"], **options)
        return
    from pipeline.labelstudio import LabelStudioClient

    client = LabelStudioClient.from_env()
    with tempfile.TemporaryDirectory() as tmp:
        export_path, config_path = Path(tmp) / "export.json", Path(tmp) / "label_config.xml"
        client.export_snapshot(project, export_path)
        config_path.write_text(client.label_config_xml(project), encoding="utf-8")
        convert_file(export_path, config_path, paths["conll_dir"], paths["convert_report"], **options)


def pull(params: dict[str, Any], project: int) -> None:
    """Snapshot a live project into the export file and label config that ``dvc repro`` reads."""
    from pipeline.labelstudio import LabelStudioClient

    paths = params["paths"]
    client = LabelStudioClient.from_env()
    client.export_snapshot(project, paths["export"])
    with atomic_open(paths["label_config"]) as fh:
        fh.write(client.label_config_xml(project).rstrip("\n") + "\n")
    log.info("project %d -> %s and %s; run `dvc repro` next", project, paths["export"], paths["label_config"])
