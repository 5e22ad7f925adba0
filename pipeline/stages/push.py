"""The push command and DVC stage: the predictions folder (data/predictions/: shards and manifest.json, read
one shard at a time), or a single Label Studio import file, into a Label Studio project.

``main()`` reads its params once and calls the layers with plain values.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.core.config import PushConfig
from pipeline.core.errors import (
    LabelStudioConfigError,
    LabelStudioError,
    ParamsError,
    PipelineError,
)
from pipeline.labelstudio.client import LabelStudioClient
from pipeline.labelstudio.push import push
from pipeline.labelstudio.shards import Predictions

log = logging.getLogger(__name__)


def main(params: dict[str, Any], project: int | None = None) -> None:
    paths, conf = params["paths"], PushConfig.from_params(params)
    project_id = project if project is not None else conf.project
    if project_id is None:
        raise ParamsError("no Label Studio project: pass --project ID or set push.project in params.yaml")
    tasks = Predictions(paths["predictions"])  # not found, unfinished or changed: one line, nothing sent
    client = LabelStudioClient.from_env(retries=conf.retries, backoff=conf.backoff)
    try:
        summary = push(client, int(project_id), tasks, conf, state_path=paths.get("push_state"))
    except LabelStudioConfigError:
        raise  # wrong URL or key: said once, nothing to continue
    except LabelStudioError as exc:
        raise LabelStudioError(f"{exc}. What was sent is on record; run push again to continue.") from None
    if summary.failed:
        raise PipelineError(f"{len(summary.failed)} tasks could not be pushed (see the log above)")
