"""Send predictions into a Label Studio project as pre-annotations, exactly once.

Before anything is sent, the project's label config is checked against the
predictions (region names and labels, after the optional label map): a
mismatch sends nothing. Each prediction is created at most once per
``model_version``: the server is asked what it already holds, and a local
record (``paths.push_state``) lists what this machine sent, so a push cut off
by a restart or Ctrl-C continues where it stopped when run again.

Two modes: ``attach`` adds predictions to tasks already in the project
(matched by task id, or by the text when ids differ); ``import`` creates the
tasks together with their predictions.

The predictions are read as a stream, twice (check, then send), one batch of
``push.batch_size`` tasks in memory: a predictions folder's shards one at a
time (``pipeline.labelstudio.shards.Predictions``), or a list. What is held
for the whole push is what the project has: its tasks' keys and ids, and its
predictions' (task, model_version) pairs, read once at the start.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core.config import PushConfig
from pipeline.core.errors import LabelConfigMismatch, LabelStudioError
from pipeline.labelstudio.client import LabelStudioClient
from pipeline.labelstudio.labelconfig import LabelConfig

log = logging.getLogger(__name__)



@dataclass
class PushSummary:
    """What one push did, counted per project task (``matched``) and per prediction sent or not."""

    matched: int = 0
    created: int = 0
    skipped_existing: int = 0
    duplicates: int = 0  # predictions whose task text (or id) came earlier in the same file: sent once per target
    failed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"matched": self.matched, "created": self.created, "skipped_existing": self.skipped_existing,
                "duplicates": self.duplicates, "failed": len(self.failed), "failures": self.failed}


class PushRecord:
    """Append-only JSONL of what was sent, per project and model version; survives a crash mid-push."""

    def __init__(self, path: str | Path | None, project_id: int, url: str) -> None:
        self.path = Path(path) if path else None
        self.scope = {"project": project_id, "server": hashlib.sha256(url.encode()).hexdigest()[:12]}
        self.done: set[tuple[str, str]] = set()
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that prediction is re-checked with the server
                if all(entry.get(k) == v for k, v in self.scope.items()):
                    self.done.add((entry["key"], entry["model_version"]))

    def add(self, entries: list[tuple[str, str]]) -> None:
        self.done.update(entries)
        if not self.path or not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            for key, version in entries:
                fh.write(json.dumps({**self.scope, "key": key, "model_version": version}) + "\n")


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def map_labels(tasks: Iterable[dict[str, Any]], label_map: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Rename model labels to the project's names (``push.label_map``), on copies, as the tasks stream by."""
    for task in tasks:
        if not label_map:
            yield task
            continue
        preds = []
        for pred in task.get("predictions", []):
            result = [{**r, "value": {**r["value"], "labels": [label_map.get(x, x) for x in r["value"]["labels"]]}}
                      for r in pred.get("result", [])]
            preds.append({**pred, "result": result})
        yield {**task, "predictions": preds}


def json_bytes(value: Any) -> int:
    """Bytes of ``value`` as JSON with every non-ASCII character escaped: the most a client sends for it."""
    return len(json.dumps(value))


def batches(tasks: Iterable[dict[str, Any]], size: int, max_bytes: int | None = None,
            weigh: Any = json_bytes) -> Iterator[list[dict[str, Any]]]:
    """Runs of at most ``size`` tasks whose ``weigh``-ed JSON stays within ``max_bytes`` (a task heavier than
    that goes alone: Label Studio says whether it takes it)."""
    if max_bytes is None:
        it = iter(tasks)
        while batch := list(islice(it, size)):
            yield batch
        return
    batch, used = [], 0
    for task in tasks:
        weight = weigh(task)
        if batch and (len(batch) >= size or used + weight > max_bytes):
            yield batch
            batch, used = [], 0
        batch.append(task)
        used += weight
    if batch:
        yield batch


class _Relabeled:
    """The tasks with ``push.label_map`` applied, readable again (each pass reads the source again)."""

    def __init__(self, tasks: Iterable[dict[str, Any]], label_map: dict[str, str]) -> None:
        self.tasks, self.label_map = tasks, label_map

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map_labels(self.tasks, self.label_map)


def check_against_config(tasks: Iterable[dict[str, Any]], config: LabelConfig) -> None:
    """List every region name and label that the project does not define."""
    problems: Counter = Counter()
    for task in tasks:
        for pred in task.get("predictions", []):
            for region in pred.get("result", []):
                if region.get("from_name") != config.from_name or region.get("to_name") != config.to_name:
                    problems[f"region {region.get('from_name')}->{region.get('to_name')} "
                             f"(project has {config.from_name}->{config.to_name})"] += 1
                for label in region.get("value", {}).get("labels", []):
                    if label not in config.labels:
                        problems[f"label {label!r} not in project labels {list(config.labels)}"] += 1
    if problems:
        lines = "; ".join(f"{what} x{n}" for what, n in problems.most_common())
        raise LabelConfigMismatch(f"predictions do not fit the project's label config, nothing sent: {lines} "
                                  "(push.label_map can rename labels)")


def push(client: LabelStudioClient, project_id: int, tasks: Iterable[dict[str, Any]],
         options: PushConfig | None = None, state_path: str | Path | None = None) -> PushSummary:
    """Send ``tasks``' predictions (``options``: the ``push`` section: match, mode, label map, batch size).

    ``tasks`` is read twice: a list, or a re-readable stream such as ``Predictions`` (its ``total`` sizes the
    progress bar); a one-shot iterator is read into a list first.
    """
    options = options or PushConfig()
    match, batch_size = options.match, options.batch_size
    max_bytes = int(options.max_request_mb * 1_000_000)
    if iter(tasks) is tasks:  # a generator: cannot be read twice
        tasks = list(tasks)
    total = len(tasks) if isinstance(tasks, (list, tuple)) else getattr(tasks, "total", None)
    tasks = _Relabeled(tasks, options.label_map)
    config = client.label_config(project_id)
    check_against_config(tasks, config)

    def key_of(task: dict[str, Any]) -> str:
        return text_key(str(task["data"].get(config.data_key, ""))) if match == "text" else str(task.get("id"))

    record = PushRecord(state_path, project_id, client.url)
    summary = PushSummary()
    if options.mode == "import":
        _import(client, project_id, tasks, key_of, record, summary, (batch_size, max_bytes), total)
    else:
        _attach(client, project_id, tasks, key_of, record, summary, (batch_size, max_bytes), match, total)
    log.info("push to project %d: %d tasks matched, %d predictions created, %d skipped as already present, "
             "%d duplicates of an earlier task in the file, %d failed", project_id, summary.matched,
             summary.created, summary.skipped_existing, summary.duplicates, len(summary.failed))
    for failure in summary.failed[:10]:
        log.warning("not pushed: task %s: %s", failure["task"], failure["reason"])
    return summary


def _attach(client: LabelStudioClient, project_id: int, tasks: Iterable[dict[str, Any]], key_of: Any,
            record: PushRecord, summary: PushSummary, limits: tuple[int, int], match: str, total: int | None) -> None:
    """Each prediction goes to every project task with its key: two tasks with the same text both get it."""
    targets: dict[str, list[int]] = defaultdict(list)
    for task in client.iter_task_data(project_id):
        targets[key_of(task)].append(int(task["id"]))
    existing = {(int(p["task"]), p.get("model_version")) for p in client.list_predictions(project_id=project_id)}
    handled: set[tuple[int, str]] = set()  # (project task, model version) dealt with in this push
    with tqdm(total=total, desc="push", unit="task", mininterval=2.0) as bar:
        # a request carries the task's predictions, not its data
        for chunk in batches(tasks, *limits, weigh=lambda t: json_bytes(t.get("predictions", []))):
            batch, keys = [], []
            for task in chunk:
                key = key_of(task)
                if key not in targets:
                    summary.failed.append({"task": task.get("id"),
                                           "reason": f"no task in project {project_id} with the same {match}"})
                    continue
                for pred in task.get("predictions", []):
                    version = pred["model_version"]
                    fresh = [t for t in targets[key] if (t, version) not in handled]
                    if not fresh:
                        summary.duplicates += 1
                        continue
                    for target in fresh:
                        handled.add((target, version))
                        summary.matched += 1
                        if (f"{key}@{target}", version) in record.done or (target, version) in existing:
                            summary.skipped_existing += 1
                            continue
                        batch.append({"task": target, "result": pred["result"], "score": pred.get("score"),
                                      "model_version": version})
                        keys.append((f"{key}@{target}", version))
            if batch:
                client.import_predictions(project_id, batch)
                record.add(keys)
                summary.created += len(batch)
            bar.update(len(chunk))


def _import(client: LabelStudioClient, project_id: int, tasks: Iterable[dict[str, Any]], key_of: Any,
            record: PushRecord, summary: PushSummary, limits: tuple[int, int], total: int | None) -> None:
    """Create the file's tasks with their predictions; the n-th task of a text exists once the project has n."""
    present = Counter(key_of(t) for t in client.iter_task_data(project_id))
    seen: Counter = Counter()
    with tqdm(total=total, desc="import", unit="task", mininterval=2.0) as bar:
        for batch in batches(tasks, *limits, weigh=lambda t: json_bytes(_payload([t])[0])):
            bar.update(len(batch))
            todo = []
            for task in batch:
                key = key_of(task)  # a hash of the text: computed once per task
                seen[key] += 1
                if seen[key] > present[key]:
                    todo.append(task)
            summary.skipped_existing += len(batch) - len(todo)
            if not todo:
                continue
            try:
                client.import_tasks(project_id, _payload(todo))
            except LabelStudioError:
                # the import may have arrived before the connection broke: look before sending again
                now = Counter(key_of(t) for t in client.iter_task_data(project_id))
                arrived = now - present
                rest = []
                for task in todo:
                    key = key_of(task)
                    if arrived[key] > 0:
                        arrived[key] -= 1
                    else:
                        rest.append(task)
                if rest:
                    client.import_tasks(project_id, _payload(rest))
            present.update(key_of(t) for t in todo)
            summary.matched += len(todo)
            summary.created += sum(len(t.get("predictions", [])) for t in todo)
            record.add([(key_of(t), p["model_version"]) for t in todo for p in t.get("predictions", [])])


def _payload(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"data": t["data"], "predictions": t.get("predictions", [])} for t in tasks]
