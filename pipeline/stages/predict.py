"""Pre-annotate tasks: the ONNX runtime's entities wrapped as Label Studio predictions.

Output is a Label Studio import file: each task keeps its ``id`` and ``data``
and gains ``predictions: [{model_version, score, result}]``, where each region
carries its own score and ``from_name``/``to_name`` come from the label config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core.atomic import write_json
from pipeline.core.config import PredictConfig
from pipeline.core.errors import ParamsError
from pipeline.labelstudio.labelconfig import LabelConfig, check_labels, read_label_config
from pipeline.labelstudio.regions import to_ls_prediction
from pipeline.labelstudio.tasks import iter_export, task_text
from pipeline.runtime.inference import NerRuntime

log = logging.getLogger(__name__)


def select_tasks(tasks: list[dict[str, Any]], which: str) -> list[dict[str, Any]]:
    if which == "all":
        return tasks
    if which == "unlabeled":
        return [t for t in tasks if not any(not a.get("was_cancelled") for a in t.get("annotations") or [])]
    raise ParamsError(f"predict.tasks: {which!r} is not 'unlabeled' or 'all'")


def predict_tasks(runtime: NerRuntime, tasks: list[dict[str, Any]], config: LabelConfig,
                  model_version: str | None = None, chunk: int = 256,
                  uncertainty: str = "sequence") -> list[dict[str, Any]]:
    """Each task with one prediction; its ``score`` is the ``uncertainty`` confidence (predict.uncertainty)."""
    check_labels(runtime.entity_types, config)
    version = model_version or runtime.model_version
    texts = [task_text(t, config.data_key) for t in tasks]
    out = []
    with tqdm(total=len(tasks), desc="predict", mininterval=2.0) as bar:
        for lo in range(0, len(tasks), chunk):
            for task, pred in zip(tasks[lo:lo + chunk], runtime.predict(texts[lo:lo + chunk])):
                out.append({"id": task.get("id"), "data": task["data"],
                            "predictions": [to_ls_prediction(pred, config, version, uncertainty)]})
            bar.update(min(chunk, len(tasks) - lo))
    return out


def main(params: dict[str, Any]) -> None:
    paths, conf = params["paths"], PredictConfig.from_params(params)
    runtime = NerRuntime(paths["onnx_dir"], quantized=conf.quantized, threads=conf.threads,
                         max_tokens=conf.max_tokens, batch_size=conf.batch_size)
    config = read_label_config(paths["label_config"])
    tasks = select_tasks(list(iter_export(paths["export"])), conf.tasks)
    predicted = predict_tasks(runtime, tasks, config, conf.model_version or None, uncertainty=conf.uncertainty)
    write_json(Path(paths["predictions"]), predicted, indent=1)
    n_entities = sum(len(t["predictions"][0]["result"]) for t in predicted)
    log.info("wrote %d tasks with %d predicted entities (%s) to %s", len(predicted), n_entities,
             predicted[0]["predictions"][0]["model_version"] if predicted else "-", paths["predictions"])
