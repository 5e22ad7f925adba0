"""What a conversion reports: the span it works on, counts per policy and label, every span changed or
dropped, every task skipped; the report file and the log summary.

The report is where the converter's promise is kept (see ``pipeline.labelstudio.convert``): nothing is lost
silently, each change is listed with its task id, annotation id, offsets and reason.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_open
from pipeline.core.errors import TaskError

log = logging.getLogger(__name__)

SHOWN_SKIPPED = 10  # skipped tasks named in the log; the report lists all of them


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
