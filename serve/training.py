"""Training jobs of the labelling loop, started by Label Studio's webhooks and run beside the service.

At most one job runs at a time, as its own process (``python -m pipeline loop-job``) at a lower CPU priority
(``loop.nice``), so requests keep being answered from the served model. Events that arrive during a job
coalesce into at most one follow-up job. A job that promotes swaps ``models/served``; when it ends, the
service's reloader is asked to check, and the new model serves from the next batch on.

One service trains for one Label Studio project: the first project that asks is bound (recorded in
``<loop_dir>/project.json``), and another project's training request is refused with a message naming both.
Prediction (``/predict``) serves every project.

State survives a restart: each job's ``status.json`` is on disk; a job still marked running when the service
starts was cut off (its process is stopped if it is still alive) and shows as ``interrupted``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.core.config import LoopConfig
from pipeline.core.errors import ParamsError, PipelineError
from pipeline.labelstudio.client import LabelStudioClient
from pipeline.core.params import load_params
from pipeline.loop.job import STATUS_FILE, JobStatus
from pipeline.loop.registry import Registry

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})


#: Projects whose webhook the service sets up at most (a client cannot make it call Label Studio without end).
MAX_CONNECTED = 64


class Webhook:
    """The webhook Label Studio made for this backend (``<public url>/webhook``), given our key as a header.

    Label Studio creates it, without credentials, when the backend is connected, so annotation events would
    be refused (401) by a service that checks a key. With ``NER_PUBLIC_URL`` (the URL Label Studio was given)
    and ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``, the service adds ``Authorization: Bearer <key>`` to
    exactly that webhook. It may not exist yet when ``/setup`` arrives: a few tries, a second apart.
    """

    def __init__(self, public_url: str, api_key: str, tries: int = 20) -> None:
        self.url = public_url.rstrip("/") + "/webhook"
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self.tries = tries

    def authorize(self, project: int) -> bool:
        try:
            client = LabelStudioClient.from_env(retries=2)
            for _ in range(self.tries):
                if client.add_webhook_headers(project, self.url, self._headers):
                    log.info("project %d: its webhook %s now carries the key", project, self.url)
                    return True
                time.sleep(1.0)
        except PipelineError as exc:
            log.warning("project %d: could not give its webhook the key (%s); annotation events will be "
                        "refused until it has an Authorization header (README)", project, exc)
            return False
        log.warning("project %d has no webhook to %s; annotation events need one (README)", project, self.url)
        return False


class TrainingRefused(Exception):
    """A training request this service will not take (another project); the message says why."""


class TrainingManager:
    """One job at a time, a coalesced follow-up, the history, and the bound project."""

    def __init__(self, root: Path, params_file: Path, served_dir: Callable[[], Path | None],
                 on_finish: Callable[[JobStatus], None], webhook: Webhook | None = None) -> None:
        params = load_params(params_file)
        self.root, self.params_file = root, params_file
        self.conf = LoopConfig.from_params(params)
        self.loop_dir = root / _path(params, "loop_dir", params_file)
        self.served_link = Registry(root / _path(params, "registry_dir", params_file)).served_link
        self.served_dir, self.on_finish, self.webhook = served_dir, on_finish, webhook
        self._connected: set[int] = set()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._current: JobStatus | None = None
        self._pending: str | None = None  # the reason of the queued follow-up job
        self._coalesced = 0               # events folded into it since
        self._annotations = 0
        self.project = self._bound_project()
        self.history: list[JobStatus] = self._recover()

    # -- requests -------------------------------------------------------------------------------------------
    def request(self, project: int, reason: str) -> str:
        """Start a job, or queue one follow-up if a job runs: ``"started"``, ``"queued"`` or ``"coalesced"``."""
        with self._lock:
            self._bind(project)
            if self._current is not None:
                if self._pending is None:
                    self._pending, self._coalesced = reason, 0
                    return "queued"
                self._coalesced += 1  # a count, not a list: no client can grow it
                return "coalesced"
            self._start(reason)
            return "started"

    def annotation_event(self, project: int) -> str:
        """Count an annotation event; start (or queue) a job every ``loop.every_annotations`` of them."""
        every = self.conf.every_annotations
        with self._lock:
            if every == 0 or (self.project is not None and project != self.project):
                return "ignored"
            self._annotations += 1
            if self._annotations < every:
                return "counted"
            self._annotations = 0
        return self.request(project, f"{every} new or updated annotations")

    def connect(self, project: int) -> None:
        """A project connected (``/setup``): once, in the background, give its webhook to this service the key."""
        with self._lock:
            if self.webhook is None or project in self._connected or len(self._connected) >= MAX_CONNECTED:
                return
            self._connected.add(project)
        threading.Thread(target=self.webhook.authorize, args=(project,), name=f"webhook-{project}",
                         daemon=True).start()

    # -- what /v1/training shows ----------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        with self._lock:
            current = self._current
            if current is not None:
                current = self._read(current)
            history = list(self.history[-self.conf.history:])
            pending = self._pending
        return {"project": self.project, "current": _public(current) if current else None,
                "pending": pending is not None, "history": [_public(j) for j in reversed(history)]}

    def close(self, timeout: float = 10.0) -> None:
        """Stop a running job (its whole process group): it ends ``interrupted``; nothing half-done is served."""
        with self._lock:
            proc, self._pending = self._proc, None
        if proc is not None and proc.poll() is None:
            _stop_group(proc.pid, timeout, proc)

    # -- internals ------------------------------------------------------------------------------------------
    def _bind(self, project: int) -> None:
        if self.project is None:
            self.project = project
            write_json(self.loop_dir / "project.json", {"project": project})
        elif project != self.project:
            raise TrainingRefused(f"this service trains for Label Studio project {self.project}, not {project}: "
                                  f"run one service per project (another folder), or remove "
                                  f"{self.loop_dir / 'project.json'} to rebind it")

    def _bound_project(self) -> int | None:
        path = self.loop_dir / "project.json"
        return int(json.loads(path.read_text(encoding="utf-8"))["project"]) if path.is_file() else None

    def _start(self, reason: str) -> None:
        """Write the job's first status and start its process (caller holds the lock)."""
        job_id = _new_job_id(self.loop_dir / "jobs")
        status = JobStatus(job_id, int(self.project), reason)  # type: ignore[arg-type] - bound by _bind
        job_dir = self.loop_dir / "jobs" / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        status.write(job_dir)
        cmd = [sys.executable, "-m", "pipeline", "--params", str(self.params_file), "loop-job",
               "--project", str(self.project), "--job-id", job_id, "--reason", reason]
        served = self.served_dir()
        if served is not None:
            cmd += ["--served-dir", str(served.resolve())]
        nice = self.conf.nice
        with (job_dir / "job.log").open("ab") as out:
            self._proc = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=lambda: os.nice(nice))
        status.pid = self._proc.pid
        status.write(job_dir)
        self._current = status
        log.info("training job %s started (%s), pid %d at nice %d", job_id, reason, self._proc.pid, nice)
        threading.Thread(target=self._watch, args=(self._proc, status), name=f"job-{job_id}", daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes], status: JobStatus) -> None:
        code = proc.wait()
        final = self._read(status)
        if final.state == "running":  # the process died without finishing its status (killed, crashed)
            final.finish("interrupted" if code < 0 else "failed", f"job process exited with {code} during "
                         f"{final.stage}; see {self.loop_dir / 'jobs' / status.job_id / 'job.log'}")
            final.write(self.loop_dir / "jobs" / status.job_id)
        log.info("training job %s ended: %s (%s)", final.job_id, final.decision, final.detail)
        try:
            self.on_finish(final)
        except Exception:  # noqa: BLE001 - a failed reload must not stop the queue
            log.exception("after job %s", final.job_id)
        with self._lock:
            self.history.append(final)
            self._current, self._proc = None, None
            pending, self._pending = self._pending, None
            if pending:
                more = f" (and {self._coalesced} more events during job {final.job_id})" if self._coalesced else ""
                self._start(pending + more)

    def _read(self, status: JobStatus) -> JobStatus:
        try:
            return JobStatus.read(self.loop_dir / "jobs" / status.job_id)
        except (OSError, ValueError, TypeError):
            return status

    def _recover(self) -> list[JobStatus]:
        """Finished jobs from disk; a job left running by an earlier service is stopped and marked interrupted."""
        jobs = []
        for path in sorted((self.loop_dir / "jobs").glob(f"*/{STATUS_FILE}")):
            try:
                status = JobStatus.read(path.parent)
            except (OSError, ValueError, TypeError):
                continue
            if status.state == "running":
                if status.pid and _is_our_job(status.pid, status.job_id):
                    _stop_group(status.pid, 10.0)
                status.finish("interrupted", f"the service stopped during {status.stage}; start training again")
                status.write(path.parent)
            jobs.append(status)
        return jobs[-max(self.conf.history, 1):]


def _path(params: dict[str, Any], key: str, params_file: Path) -> str:
    value = (params.get("paths") or {}).get(key)
    if not isinstance(value, str) or not value:
        raise ParamsError(f"paths.{key} is missing in {params_file}: the labelling loop needs it (see the "
                          "project's params.yaml), or turn the loop off with NER_LOOP=0")
    return value


def _public(status: JobStatus) -> dict[str, Any]:
    """A job as ``/v1/training`` shows it: its status plus the elapsed seconds, without the pid."""
    out = asdict(status)
    out.pop("pid", None)
    out["elapsed_s"] = round((status.finished_at or time.time()) - status.started_at, 1)
    return out


def _new_job_id(jobs_dir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while (jobs_dir / f"{stamp}-{n}").exists():
        n += 1
    return f"{stamp}-{n}"


def _is_our_job(pid: int, job_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"loop-job" in cmdline and job_id.encode() in cmdline


def _stop_group(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM to the job's process group (DVC and its stages too), SIGKILL after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)
