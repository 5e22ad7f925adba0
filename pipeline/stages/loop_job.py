"""``python -m pipeline loop-job``: one training job of the labelling loop (what the service starts in the
background on *Start Training*; see ``pipeline/loop/job.py``). Also runnable by hand from the project folder.

``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` come from the environment, never from the params.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.core.config import LoopConfig, PushConfig
from pipeline.core.errors import PipelineError
from pipeline.labelstudio.client import LabelStudioClient
from pipeline.loop.job import STATUS_FILE, JobPaths, JobStatus, run_job

log = logging.getLogger(__name__)


def main(params: dict[str, Any], project: int, job_id: str | None = None, reason: str = "by hand",
         served_dir: str | None = None) -> None:
    """Run one job; ends in one line saying how it ended (exit 2 unless promoted or rejected)."""
    conf, push_conf = LoopConfig.from_params(params), PushConfig.from_params(params)
    where = params["paths"]
    paths = JobPaths(root=Path.cwd(), loop_dir=Path(where["loop_dir"]), registry_dir=Path(where["registry_dir"]),
                     job_id=job_id or time.strftime("%Y%m%d-%H%M%S"), model_dir=Path(where["model_dir"]),
                     onnx_dir=Path(where["onnx_dir"]), encoder=Path(where["encoder"]))
    status_file = paths.job_dir / STATUS_FILE
    status = JobStatus.read(paths.job_dir) if status_file.is_file() else JobStatus(paths.job_id, project, reason)
    client = LabelStudioClient.from_env(retries=push_conf.retries, backoff=push_conf.backoff)
    status = run_job(paths, status, conf, push_conf, client, Path(served_dir) if served_dir else None)
    log.info("job %s %s: %s", status.job_id, status.decision, status.detail)
    if status.decision == "failed":
        raise PipelineError(f"loop job {status.job_id} failed: {status.detail}")
