"""Pre-annotation as a stream: an export's tasks in, Label Studio predictions out in shards, in flat memory.

Tasks stream from the export (a JSON list, gzip too, or JSON Lines), are selected (``unlabeled`` or ``all``),
predicted in batches and written as they go (``pipeline.labelstudio.shards``). A first pass over the file
counts and checks the tasks (a broken task stops the run before anything is predicted, and the count gives
the progress bar its ETA); the file's sha256 names the input.

Batches are cut at multiples of ``chunk`` over the selected tasks, whatever the shard size and wherever a run
resumes, so the runtime sees the same batches (same padding, same floats) as an uninterrupted run and as
:func:`predict_tasks` over the whole list. The runtime is handed in (this layer does not import it): anything
with ``predict(texts)``, ``model_version`` and ``entity_types``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from pipeline.core.errors import ConversionError, ParamsError
from pipeline.labelstudio.labelconfig import LabelConfig, check_labels
from pipeline.labelstudio.regions import to_ls_prediction
from pipeline.labelstudio.shards import ShardWriter, check_output, file_sha256
from pipeline.labelstudio.tasks import iter_export, json_kind, task_text

if TYPE_CHECKING:  # the runtime hands its predictions in; this layer does not depend on it
    from pipeline.runtime.inference import TextPrediction

log = logging.getLogger(__name__)

CHUNK = 256  # tasks handed to the runtime at once (it sorts them by length into its own batches)


class Predictor(Protocol):
    model_version: str
    entity_types: list[str]

    def predict(self, texts: list[str]) -> list[TextPrediction]: ...


def is_unlabeled(task: dict[str, Any]) -> bool:
    return not any(not a.get("was_cancelled") for a in task.get("annotations") or [])


def select_tasks(tasks: Iterable[Any], which: str) -> Iterator[dict[str, Any]]:
    """The tasks to pre-annotate: ``unlabeled`` (no annotation that was not cancelled) or ``all``."""
    if which not in ("unlabeled", "all"):
        raise ParamsError(f"predict.tasks: {which!r} is not 'unlabeled' or 'all'")
    for number, task in enumerate(tasks, 1):
        if not isinstance(task, dict):
            raise ConversionError(f"item {number} of the tasks is {json_kind(task)}, not a task object")
        if which == "all" or is_unlabeled(task):
            yield task


def predicted_task(task: dict[str, Any], pred: TextPrediction, config: LabelConfig, version: str,
                   uncertainty: str) -> dict[str, Any]:
    """The task as Label Studio imports it: its ``id`` and ``data``, and one prediction."""
    return {"id": task.get("id"), "data": task["data"],
            "predictions": [to_ls_prediction(pred, config, version, uncertainty)]}


def predict_tasks(runtime: Predictor, tasks: list[dict[str, Any]], config: LabelConfig,
                  model_version: str | None = None, chunk: int = CHUNK,
                  uncertainty: str = "sequence") -> list[dict[str, Any]]:
    """All of ``tasks`` at once, in memory (the reference the stream matches task for task)."""
    check_labels(runtime.entity_types, config)
    version = model_version or runtime.model_version
    texts = [task_text(t, config.data_key) for t in tasks]
    out = []
    for lo in range(0, len(tasks), chunk):
        for task, pred in zip(tasks[lo:lo + chunk], runtime.predict(texts[lo:lo + chunk])):
            out.append(predicted_task(task, pred, config, version, uncertainty))
    return out


def count_tasks(export: str | Path, which: str, data_key: str) -> tuple[int, int]:
    """(tasks in the file, tasks selected); every selected task's text is checked on the way."""
    total = 0

    def counted() -> Iterator[Any]:
        nonlocal total
        for task in iter_export(export):
            total += 1
            yield task

    selected = 0
    for task in select_tasks(counted(), which):
        task_text(task, data_key)
        selected += 1
    return total, selected


def predict_export(runtime: Predictor, export: str | Path, out: str | Path, config: LabelConfig, *,
                   which: str = "unlabeled", shard_size: int = 10000, uncertainty: str = "sequence",
                   model_version: str | None = None, model_sha256: str = "", settings: dict[str, Any] | None = None,
                   chunk: int = CHUNK, progress: bool = True) -> dict[str, Any]:
    """Predict the selected tasks of ``export`` into the shards folder ``out``; returns its manifest.

    ``settings`` (e.g. the ``predict`` params) join the input hash, model version and model hash in the key
    that finished shards of an interrupted run must match to be kept.
    """
    export, out = Path(export), Path(out)
    check_output(out)
    check_labels(runtime.entity_types, config)
    version = model_version or runtime.model_version
    input_sha = file_sha256(export) if export.is_file() else ""
    total, selected = count_tasks(export, which, config.data_key)
    key = {"input_sha256": input_sha, "model_version": version, "model_sha256": model_sha256, "tasks": which,
           "uncertainty": uncertainty, "shard_size": shard_size, "chunk": chunk,
           "label_config": [config.from_name, config.to_name, config.data_key, list(config.labels)],
           "settings": settings or {}}
    with ShardWriter(out, key, shard_size) as writer:
        start = writer.done
        first = start - start % chunk  # the batch that holds the first task to write starts here
        with tqdm(total=selected, initial=start, unit="task", desc="predict", mininterval=2.0,
                  disable=not progress) as bar:
            batch: list[dict[str, Any]] = []

            def flush(lo: int) -> None:
                preds = runtime.predict([task_text(t, config.data_key) for t in batch])
                for index, (task, pred) in enumerate(zip(batch, preds), lo):
                    if index >= start:
                        done = predicted_task(task, pred, config, version, uncertainty)
                        writer.add(done, len(done["predictions"][0]["result"]))
                bar.update(lo + len(batch) - max(lo, start))
                batch.clear()

            lo = first
            for index, task in enumerate(islice(select_tasks(iter_export(export), which), first, None), first):
                batch.append(task)
                if (index + 1) % chunk == 0:
                    flush(lo)
                    lo = index + 1
            if batch:
                flush(lo)
        manifest = writer.finish({"model_version": version, "model_sha256": model_sha256,
                                  "input": {"file": export.name, "sha256": input_sha, "tasks": total},
                                  "selection": which, "uncertainty": uncertainty})
    log.info("wrote %d tasks with %d predicted entities (%s) in %d shards to %s", manifest["tasks"],
             manifest["entities"], version, len(manifest["shards"]), out)
    return manifest
