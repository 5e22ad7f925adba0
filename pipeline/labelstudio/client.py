"""The only module that talks to Label Studio (through ``label-studio-sdk`` 2.x).

URL and API key come from the environment (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``), never from params files, and the key is never
logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.core.atomic import atomic_open
from pipeline.core.errors import LabelStudioConfigError, LabelStudioError
from pipeline.labelstudio.labelconfig import LabelConfig, parse_label_config

log = logging.getLogger(__name__)

URL_ENV = "LABEL_STUDIO_URL"
KEY_ENV = "LABEL_STUDIO_API_KEY"


def _plain(obj: Any) -> Any:
    """SDK objects are pydantic models; the rest of the pipeline works on plain dicts."""
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj


class LabelStudioClient:
    """A session with one Label Studio server.

    Reads are retried with exponential backoff on connection errors, 429 and
    5xx answers (a server restarting is the usual cause). Writes are never
    blindly repeated: after a failed import the server is asked what arrived
    before trying again, so nothing is created twice.
    """

    def __init__(self, url: str, api_key: str, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5) -> None:
        from label_studio_sdk import LabelStudio  # imported here: serving does not need the SDK

        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise LabelStudioConfigError(f"{URL_ENV} {url!r} is not an http:// or https:// URL "
                                         "(e.g. http://localhost:8080)")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self._sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout, max_retries=0)

    def __repr__(self) -> str:  # never show the key
        return f"LabelStudioClient({self.url!r})"

    @classmethod
    def from_env(cls, **options: Any) -> LabelStudioClient:
        url, key = os.environ.get(URL_ENV), os.environ.get(KEY_ENV)
        missing = [name for name, value in ((URL_ENV, url), (KEY_ENV, key)) if not value]
        if missing:
            raise LabelStudioError(f"set {' and '.join(missing)} in the environment to reach Label Studio")
        return cls(url, key, **options)

    @staticmethod
    def _transient(exc: Exception) -> bool:
        import httpx

        status = getattr(exc, "status_code", None)
        return isinstance(exc, httpx.TransportError) or status == 429 or (status is not None and status >= 500)

    def _fail(self, what: str, exc: Exception) -> LabelStudioError:
        status = getattr(exc, "status_code", None)
        body = getattr(exc, "body", None)
        detail = f"HTTP {status}: {body}" if status else f"{type(exc).__name__}: {exc}"
        if status in (401, 403):
            return LabelStudioConfigError(f"{what} refused at {self.url} ({detail}): check {KEY_ENV} (a legacy "
                                          "API token from Account & Settings) and that this user can see it")
        return LabelStudioError(f"{what} failed at {self.url}: {detail}")

    def _wait(self, attempt: int) -> None:
        time.sleep(min(self.backoff * 2 ** attempt, 8.0))

    def _call(self, what: str, fn: Any, *args: Any, retry: bool = True, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except LabelStudioError:
                raise
            except Exception as exc:  # the SDK raises ApiError, httpx errors, ...
                if not (retry and self._transient(exc)) or attempt >= self.retries:
                    raise self._fail(what, exc) from exc
                log.warning("%s: %s; retrying", what, type(exc).__name__)
                self._wait(attempt)
                attempt += 1

    def create_project(self, title: str, label_config: str) -> int:
        project = self._call("create project", self._sdk.projects.create, title=title, label_config=label_config)
        return int(project.id)

    def label_config_xml(self, project_id: int) -> str:
        project = self._call(f"read project {project_id}", self._sdk.projects.get, id=project_id)
        return project.label_config

    def label_config(self, project_id: int) -> LabelConfig:
        return parse_label_config(self.label_config_xml(project_id))

    def export_snapshot(self, project_id: int, path: str | Path) -> Path:
        """Write the project's full JSON export (all tasks, cancelled annotations too) to ``path``.

        A snapshot export streams to disk, so projects of any size fit; the
        file is renamed into place only once complete.
        """
        sdk = self._sdk.projects.exports
        snapshot = self._call(f"create an export of project {project_id}", sdk.create, project_id,
                              title="ner-pipeline convert",
                              task_filter_options={"only_with_annotations": False},
                              annotation_filter_options={"usual": True, "ground_truth": True, "skipped": True},
                              serialization_options={"predictions": {"only_id": True}})
        for _ in range(600):
            status = self._call("read export status", sdk.get, project_id, snapshot.id).status
            if status == "completed":
                break
            if status == "failed":
                raise LabelStudioError(f"Label Studio could not export project {project_id}")
            time.sleep(0.5)
        else:
            raise LabelStudioError(f"export of project {project_id} did not finish in 5 minutes")
        with atomic_open(path, "wb") as fh:
            for chunk in self._call("download export", sdk.download, project_id, snapshot.id, export_type="JSON"):
                fh.write(chunk)
        log.info("exported project %d to %s", project_id, path)
        return Path(path)

    def add_webhook_headers(self, project_id: int, url: str, headers: dict[str, str]) -> int:
        """Give the project's webhooks that post to ``url`` these ``headers``; return how many post there.

        The webhook Label Studio creates for a connected ML backend (``<backend url>/webhook``, every action)
        carries no credentials, so a backend that checks a key refuses its annotation events until it has one.
        """
        hooks = self._call(f"list webhooks of project {project_id}", self._sdk.webhooks.list, project=str(project_id))
        matching = [h for h in hooks if (h.url or "").rstrip("/") == url.rstrip("/")]
        for hook in matching:
            current = dict(hook.headers or {}) if isinstance(hook.headers, dict) else {}
            if any(current.get(k) != v for k, v in headers.items()):
                self._call(f"update webhook {hook.id}", self._sdk.webhooks.update, hook.id,
                           headers={**current, **headers})
        return len(matching)

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks (optionally with inline ``predictions``); return the new task ids."""
        response = self._call(f"import {len(tasks)} tasks into project {project_id}",
                              self._sdk.projects.import_tasks, project_id, request=tasks, return_task_ids=True,
                              retry=False)  # not idempotent: callers check what arrived before retrying
        return [int(i) for i in (response.task_ids or [])]

    def iter_tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        """All tasks of a project (listed whole, so a failure part-way is retried from the start)."""
        tasks = self._call(f"list tasks of project {project_id}",
                           lambda: [_plain(t) for t in self._sdk.tasks.list(project=project_id, fields="all")])
        yield from tasks

    def iter_task_data(self, project_id: int, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every task's ``id`` and ``data`` only (Label Studio's ``task_only`` listing, large pages): what push
        matches on. ``fields="all"`` serializes annotations and predictions too, minutes for 20,000 tasks."""
        def listing() -> list[dict[str, Any]]:
            pages = self._sdk.tasks.list(project=project_id, fields="task_only", page_size=page_size)
            return [{"id": d["id"], "data": d["data"]} for d in map(_plain, pages)]

        yield from self._call(f"list tasks of project {project_id}", listing)

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> None:
        """Create many predictions in one request (``{task, result, score, model_version}`` each), once.

        After a failure the project's predictions are read back and only the
        missing ones are sent again, so a request that went through before the
        connection broke is not repeated.
        """
        pending = predictions
        attempt = 0
        while pending:
            try:
                self._sdk.projects.import_predictions(id=project_id, request=pending)
                return
            except Exception as exc:
                if not self._transient(exc) or attempt >= self.retries:
                    raise self._fail(f"import {len(pending)} predictions into project {project_id}", exc) from exc
                log.warning("import predictions: %s; checking before retrying", type(exc).__name__)
                self._wait(attempt)
                attempt += 1
                try:
                    present = {(p.task, p.model_version) for p in self._sdk.predictions.list(project=project_id)}
                except Exception:
                    continue  # still down: wait and try again
                pending = [p for p in pending if (p["task"], p["model_version"]) not in present]

    def list_predictions(self, *, project_id: int | None = None, task_id: int | None = None) -> list[dict[str, Any]]:
        found = self._call("list predictions", self._sdk.predictions.list, project=project_id, task=task_id)
        return [_plain(p) for p in found]
