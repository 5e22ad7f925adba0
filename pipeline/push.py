"""Send predictions into a Label Studio project as pre-annotations.

Before anything is sent the project's label config is checked against the
predictions (region names and labels): a mismatch sends nothing. A task that
already holds a prediction of the same ``model_version`` is skipped, so
running push twice creates no duplicates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.errors import LabelConfigMismatch, ParamsError, PipelineError
from pipeline.labelconfig import LabelConfig
from pipeline.labelstudio import LabelStudioClient

log = logging.getLogger(__name__)

MATCHES = ("text", "id")


@dataclass
class PushSummary:
    matched: int = 0
    created: int = 0
    skipped_existing: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"matched": self.matched, "created": self.created, "skipped_existing": self.skipped_existing,
                "failed": len(self.failed), "failures": self.failed}


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_against_config(tasks: list[dict[str, Any]], config: LabelConfig) -> None:
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
        raise LabelConfigMismatch(f"predictions do not fit the project's label config, nothing sent: {lines}")


def push(client: LabelStudioClient, project_id: int, tasks: list[dict[str, Any]], match: str = "text") -> PushSummary:
    if match not in MATCHES:
        raise ParamsError(f"push.match: {match!r} is not one of {MATCHES}")
    config = client.label_config(project_id)
    check_against_config(tasks, config)

    targets: dict[Any, int] = {}
    for task in client.iter_tasks(project_id):
        key = text_key(str(task["data"].get(config.data_key, ""))) if match == "text" else int(task["id"])
        targets.setdefault(key, int(task["id"]))
    existing = {(int(p["task"]), p.get("model_version")) for p in client.list_predictions(project_id=project_id)}

    summary = PushSummary()
    for task in tqdm(tasks, desc="push", mininterval=2.0):
        key = text_key(str(task["data"].get(config.data_key, ""))) if match == "text" else task.get("id")
        target = targets.get(key)
        if target is None:
            summary.failed.append({"task": task.get("id"), "reason": f"no task in project {project_id} "
                                   f"with the same {'text' if match == 'text' else 'id'}"})
            continue
        summary.matched += 1
        for pred in task.get("predictions", []):
            if (target, pred["model_version"]) in existing:
                summary.skipped_existing += 1
                continue
            client.create_prediction(target, pred["result"], pred.get("score"), pred["model_version"])
            existing.add((target, pred["model_version"]))
            summary.created += 1
    log.info("push to project %d: %d tasks matched, %d predictions created, %d skipped as already present, "
             "%d failed", project_id, summary.matched, summary.created, summary.skipped_existing, len(summary.failed))
    for failure in summary.failed[:10]:
        log.warning("not pushed: task %s: %s", failure["task"], failure["reason"])
    return summary


def main(params: dict[str, Any], project: int | None = None) -> None:
    paths, conf = params["paths"], params["push"]
    project_id = project if project is not None else conf.get("project")
    if project_id is None:
        raise ParamsError("no Label Studio project: pass --project ID or set push.project in params.yaml")
    path = Path(paths["predictions"])
    if not path.is_file():
        raise PipelineError(f"{path} not found; run `dvc repro` (predict stage) first")
    tasks = json.loads(path.read_text(encoding="utf-8"))
    summary = push(LabelStudioClient.from_env(), int(project_id), tasks, conf["match"])
    if summary.failed:
        raise PipelineError(f"{len(summary.failed)} tasks could not be pushed (see the log above)")
