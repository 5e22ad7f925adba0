"""Label Studio export file -> CoNLL files with exact character offsets, ``labels.json`` and the report.

Nothing is lost silently: every span that is not kept as it was annotated
(dropped, trimmed, re-anchored) is counted and listed in the report with its
task id, annotation id, offsets and reason; every task left out is listed
with the field at fault.

What stops, what is skipped: a file that cannot be read as a list of tasks
(not UTF-8, not JSON, nested too deeply, an item that is not a task or has
no usable id) stops the conversion, as does an export where no span result
matches the label config. A task whose own content is broken (``TaskError``:
a null annotation, a result that is not a list, offsets outside its text, a
``value.text`` that is not a string, a lone surrogate in its text) either
stops it in one line naming the task and field (``convert.bad_tasks: error``,
the default), or is left out and listed in the report (``skip``).

This module runs a file through (one stream, or byte ranges in parallel
processes; the output folder swapped in whole). The steps live beside it:
``tasks`` reads tasks, ``spans`` turns results into checked spans,
``sentences`` (``TaskConverter``) tags sentences and finishes the checks,
``report`` records what was changed, dropped or skipped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.config import ConvertConfig
from pipeline.core.conll import format_sentence
from pipeline.core.errors import ConversionError
from pipeline.core.tags import tag_names
from pipeline.labelstudio.duplicates import TaskRecords
from pipeline.labelstudio.jsonstream import RangeMismatch, find_item_start, first_item_start, iter_json_array
from pipeline.labelstudio.labelconfig import LabelConfig, read_label_config
from pipeline.labelstudio.report import ConvertReport, log_summary, write_report
from pipeline.labelstudio.sentences import SPLITS, TaskConverter, finish_report
from pipeline.labelstudio.tasks import iter_export

log = logging.getLogger(__name__)

PARALLEL_MIN_BYTES = 8 << 20  # below this, starting processes costs more than it saves


def run(export_path: str | Path, label_config_path: str | Path, conll_dir: str | Path,
        report_path: str | Path, *, policies: ConvertConfig | None = None,
        tasks: Iterable[dict[str, Any]] | None = None, workers: int = 1,
        parallel_min_bytes: int = PARALLEL_MIN_BYTES) -> ConvertReport:
    """Stream an export into CoNLL files under the ``convert.*`` ``policies`` (None: the defaults); the
    output folder is swapped in only when all of it converted.

    Large export files are cut into byte ranges converted by ``workers``
    processes (0: one per core); the output is the same as from one process.
    """
    config = read_label_config(label_config_path)
    policies = ConvertConfig() if policies is None else policies
    workers = workers or os.cpu_count() or 1
    with atomic_dir(conll_dir) as out:
        report = None
        if tasks is None and workers > 1 and Path(export_path).stat().st_size >= parallel_min_bytes:
            report = _convert_in_ranges(Path(export_path), config, policies, out, workers)
        if report is None:
            report = _convert_stream(tasks if tasks is not None else iter_export(export_path), config, policies, out)
        write_labels(out, config, policies.scheme)
    write_report(report_path, report)
    log_summary(report, report_path)
    return report


def _convert_stream(tasks: Iterable[dict[str, Any]], config: LabelConfig, policies: ConvertConfig,
                    out: Path) -> ConvertReport:
    return _convert_into(tasks, config, policies, out, prefix="").finish()


def _convert_into(tasks: Iterable[dict[str, Any]], config: LabelConfig, policies: ConvertConfig, out: Path,
                  prefix: str) -> TaskConverter:
    converter = TaskConverter(config, policies)
    with ExitStack() as stack:
        files = {name: stack.enter_context((out / f"{prefix}{name}.conll").open("w", encoding="utf-8"))
                 for name in SPLITS}
        for task in tasks:
            converted = converter.convert(task)
            if converted is not None:
                files[converted[0]].write(format_sentence(converted[1]))
    return converter


def _convert_range(export_path: Path, config: LabelConfig, policies: ConvertConfig, out: Path, k: int,
                   start: int, stop: int | None) -> ConvertReport:
    """Convert one byte range into ``.part{k}.*`` files; its duplicate records go to ``.part{k}.records``."""
    converter = _convert_into(iter_json_array(export_path, start=start, stop=stop), config, policies, out,
                              prefix=f".part{k}.")
    converter.records.dump(out / f".part{k}.records")
    return converter.report


def _convert_in_ranges(export_path: Path, config: LabelConfig, policies: ConvertConfig, out: Path,
                       workers: int) -> ConvertReport | None:
    """Convert byte ranges side by side; None means "do it in one pass" (odd file, or an error to report)."""
    starts = _range_starts(export_path, workers)
    if starts is None:
        return None
    ranges = list(zip(starts, starts[1:] + [None]))
    with multiprocessing.get_context("fork").Pool(len(ranges)) as pool:
        jobs = [pool.apply_async(_convert_range, (export_path, config, policies, out, k, start, stop))
                for k, (start, stop) in enumerate(ranges)]
        report = ConvertReport()
        try:
            for job in jobs:
                report.merge(job.get())
        except (RangeMismatch, ConversionError) as exc:
            log.info("parallel conversion gave up (%s); converting in one pass", exc)
            for part in out.glob(".part*"):
                part.unlink()
            return None
    parts = [out / f".part{k}.records" for k in range(len(ranges))]
    records = TaskRecords.join(parts)
    for part in parts:
        part.unlink()
        part.with_name(part.name + ".odd.json").unlink()
    _join_parts(out, len(ranges))
    finish_report(report, records, config)
    log.info("converted %d tasks in %d parallel ranges", report.counts["tasks"], len(ranges))
    return report


def _range_starts(export_path: Path, workers: int) -> list[int] | None:
    """Byte offsets where up to ``workers`` ranges of whole items start, or None if fewer than two are found."""
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
    return starts if len(starts) >= 2 else None


def _join_parts(out: Path, count: int) -> None:
    """Concatenate each split's ``.part{k}.`` files in range order into its CoNLL file, removing the parts."""
    for name in SPLITS:
        with (out / f"{name}.conll").open("wb") as target:
            for k in range(count):
                part = out / f".part{k}.{name}.conll"
                with part.open("rb") as source:
                    shutil.copyfileobj(source, target, 1 << 20)
                part.unlink()


def write_labels(conll_dir: Path, config: LabelConfig, scheme: str) -> None:
    """``labels.json``: the tag set training uses, taken from the label config (not only tags seen)."""
    write_json(conll_dir / "labels.json", {"scheme": scheme, "entity_types": list(config.labels),
                                           "tags": tag_names(list(config.labels), scheme)})
