"""Pre-annotation as a stream: an export's tasks in, Label Studio predictions out in shards, in flat memory.

Tasks stream from the export (a JSON list, gzip too, or JSON Lines), are selected (``unlabeled`` or ``all``),
predicted in batches and written as they go (``pipeline.labelstudio.shards``). A first pass over the file
counts and checks the tasks (a broken task stops the run before anything is predicted, and the count gives
the progress bar its ETA); the file's sha256 names the input.

Batches are cut at multiples of ``chunk`` over the selected tasks, whatever the shard size and wherever a run
resumes, so the runtime sees the same batches (same padding, same floats) as an uninterrupted run and as
:func:`predict_tasks` over the whole list. The runtime is handed in (this layer does not import it): anything
with ``predict(texts)``, ``model_version`` and ``entity_types``.

An engine turns the settled ``Job`` into shard lines in order: :func:`local_engine` predicts in this process;
``pipeline.labelstudio.preannotate_ray`` on Ray actors. The driver alone writes the shards, so both give the
same bytes, and either may resume what the other began.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from pipeline.core.errors import ConversionError, ParamsError
from pipeline.labelstudio.labelconfig import LabelConfig, check_labels
from pipeline.labelstudio.regions import to_ls_prediction
from pipeline.labelstudio.shards import ShardWriter, check_output, file_sha256, task_line
from pipeline.labelstudio.tasks import iter_export, iter_export_at, json_kind, task_text

if TYPE_CHECKING:  # the runtime hands its predictions in; this layer does not depend on it
    from pipeline.runtime.inference import TextPrediction

log = logging.getLogger(__name__)

CHUNK = 256  # tasks handed to the runtime at once (it sorts them by length into its own batches)


class Model(Protocol):
    model_version: str
    entity_types: list[str]


class Predictor(Model, Protocol):
    def predict(self, texts: list[str]) -> list[TextPrediction]: ...


def is_unlabeled(task: dict[str, Any]) -> bool:
    return not any(not a.get("was_cancelled") for a in task.get("annotations") or [])


def check_selection(which: str) -> None:
    if which not in ("unlabeled", "all"):
        raise ParamsError(f"predict.tasks: {which!r} is not 'unlabeled' or 'all'")


def chosen(task: Any, number: int, which: str) -> bool:
    """Whether the ``number``-th item of the tasks is one to pre-annotate."""
    if not isinstance(task, dict):
        raise ConversionError(f"item {number} of the tasks is {json_kind(task)}, not a task object")
    return which == "all" or is_unlabeled(task)


def select_tasks(tasks: Iterable[Any], which: str) -> Iterator[dict[str, Any]]:
    """The tasks to pre-annotate: ``unlabeled`` (no annotation that was not cancelled) or ``all``."""
    check_selection(which)
    for number, task in enumerate(tasks, 1):
        if chosen(task, number, which):
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


@dataclass(frozen=True)
class Job:
    """What one run predicts, settled on the driver before any prediction: engines read their tasks from it."""

    export: Path
    config: LabelConfig
    which: str
    version: str
    uncertainty: str
    chunk: int
    selected: int = 0  # tasks selected in the export
    starts: tuple[int, ...] = ()  # byte offset of every chunk's first selected task (another process reads from it)
    sha256: str = ""  # of the export

    def line(self, task: dict[str, Any], pred: TextPrediction) -> tuple[str, int]:
        """The task's line in a shard and its entity count."""
        done = predicted_task(task, pred, self.config, self.version, self.uncertainty)
        return task_line(done), len(done["predictions"][0]["result"])


#: An engine: the job and the first selected task to predict (a multiple of ``job.chunk``) in, then
#: ``(selected index, shard line, entities)`` for every selected task from there on, in order.
Engine = Callable[[Job, int], Iterator[tuple[int, str, int]]]


def count_tasks(export: str | Path, which: str, data_key: str, chunk: int = CHUNK) -> tuple[int, int, list[int]]:
    """(tasks in the file, tasks selected, byte offset of every ``chunk``-th selected task); every selected
    task's text is checked on the way."""
    check_selection(which)
    total = selected = 0
    starts: list[int] = []
    for total, (offset, task) in enumerate(iter_export_at(export), 1):
        if not chosen(task, total, which):
            continue
        task_text(task, data_key)
        if selected % chunk == 0:
            starts.append(offset)
        selected += 1
    return total, selected, starts


def local_engine(runtime: Predictor) -> Engine:
    """Predict in this process, ``job.chunk`` selected tasks at a time."""

    def rows(job: Job, first: int) -> Iterator[tuple[int, str, int]]:
        selected = islice(select_tasks(iter_export(job.export), job.which), first, None)
        index = first
        while batch := list(islice(selected, job.chunk)):
            preds = runtime.predict([task_text(t, job.config.data_key) for t in batch])
            for task, pred in zip(batch, preds):
                yield index, *job.line(task, pred)
                index += 1

    return rows


def predict_export(model: Model, export: str | Path, out: str | Path, config: LabelConfig, *,
                   which: str = "unlabeled", shard_size: int = 10000, uncertainty: str = "sequence",
                   model_version: str | None = None, model_sha256: str = "", settings: dict[str, Any] | None = None,
                   chunk: int = CHUNK, progress: bool = True, engine: Engine | None = None) -> dict[str, Any]:
    """Predict the selected tasks of ``export`` into the shards folder ``out``; returns its manifest.

    ``model`` is the runtime (the local engine predicts with it), or, with another ``engine``, anything that
    says the model's ``model_version`` and ``entity_types``. ``settings`` (e.g. the ``predict`` params that
    shape the output) join the input hash, model version and model hash in the key that finished shards of an
    interrupted run must match to be kept; any engine may finish what another began.
    """
    export, out = Path(export), Path(out)
    check_output(out)
    check_labels(model.entity_types, config)
    version = model_version or model.model_version
    input_sha = file_sha256(export) if export.is_file() else ""
    total, selected, starts = count_tasks(export, which, config.data_key, chunk)
    job = Job(export, config, which, version, uncertainty, chunk, selected, tuple(starts), input_sha)
    key = {"input_sha256": input_sha, "model_version": version, "model_sha256": model_sha256, "tasks": which,
           "uncertainty": uncertainty, "shard_size": shard_size, "chunk": chunk,
           "label_config": [config.from_name, config.to_name, config.data_key, list(config.labels)],
           "settings": settings or {}}
    engine = engine or local_engine(model)  # type: ignore[arg-type]
    with ShardWriter(out, key, shard_size) as writer:
        start = writer.done
        with tqdm(total=selected, initial=start, unit="task", desc="predict", mininterval=2.0,
                  disable=not progress) as bar:
            for index, line, entities in engine(job, start - start % chunk):
                if index >= start:
                    writer.add_json(line, entities)
                    bar.update(1)
        manifest = writer.finish({"model_version": version, "model_sha256": model_sha256,
                                  "input": {"file": export.name, "sha256": input_sha, "tasks": total},
                                  "selection": which, "uncertainty": uncertainty})
    log.info("wrote %d tasks with %d predicted entities (%s) in %d shards to %s", manifest["tasks"],
             manifest["entities"], version, len(manifest["shards"]), out)
    return manifest
