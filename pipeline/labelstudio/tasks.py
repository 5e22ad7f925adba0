"""Reading an export's tasks: the stream of tasks, each task's id and text, and the annotations it contributes.

Field checks raise ``TaskError`` (a broken task) or ``ConversionError`` (an export that cannot be read as tasks),
naming the task and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConversionError, TaskError
from pipeline.labelstudio.jsonstream import iter_json_array, iter_json_array_at, iter_json_lines, iter_json_lines_at
from pipeline.labelstudio.report import ConvertReport

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def iter_export(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream the tasks of a Label Studio JSON export file (gzip-compressed too), or of a JSON Lines file (one
    task per line) when the name ends in ``.jsonl`` (or ``.jsonl.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: export file not found")
    if is_json_lines(path):
        yield from iter_json_lines(path)
    else:
        yield from iter_json_array(path)


def is_json_lines(path: str | Path) -> bool:
    return Path(path).name.endswith((".jsonl", ".jsonl.gz"))


def iter_export_at(path: str | Path, start: int | None = None,
                   stop: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(byte offset, task)`` for the tasks of an export; with ``start``/``stop``, those whose first byte lies in
    that range (``start`` an offset this gave before). Lets another process read its share of the file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: export file not found")
    if is_json_lines(path):
        yield from iter_json_lines_at(path, start=start or 0, stop=stop)
    else:
        yield from iter_json_array_at(path, start=start, stop=stop)


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
