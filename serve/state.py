"""What the service holds while it runs: the model (behind the micro-batcher), its reloader, the label configs.

One :class:`ServiceState` per app, built by ``serve.app.create_app`` and handed to the routes (``serve/routes/``)
as a FastAPI dependency: the routes are plain functions of the request and this state, with nothing hidden in
closures. Loading a model folder (and saying in one line why one does not load) lives here too.
"""

from __future__ import annotations

import json
import logging
import threading
import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from pipeline.core.errors import LabelConfigMismatch, ModelLoadError
from pipeline.labelstudio.labelconfig import LabelConfig, check_labels
from pipeline.loop.job import JobStatus
from pipeline.runtime.inference import CRF_FILE, INFO_FILE
from serve.batching import Batched
from serve.errors import printable
from serve.labels import LabelConfigs, utf8_or_422
from serve.lanes import Lanes
from serve.memory import release_memory
from serve.observability import Metrics
from serve.reload import ModelReloader
from serve.settings import Settings
from serve.training import TrainingManager, Webhook
from serve.windows import ServingRuntime

log = logging.getLogger(__name__)


#: Projects whose label config ``/setup`` remembers (least recently used forgotten first): a client cannot
#: grow the service's memory by sending ``/setup`` for ever new project ids.
MAX_PROJECTS = 256


class ProjectConfigs:
    """The label config each Label Studio project sent to ``/setup``, keyed by project id; bounded LRU."""

    def __init__(self, max_projects: int = MAX_PROJECTS) -> None:
        self.max_projects = max_projects
        self._configs: OrderedDict[str, LabelConfig] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, project: str | None, config: LabelConfig) -> None:
        with self._lock:
            self._configs[project_key(project)] = config
            self._configs.move_to_end(project_key(project))
            while len(self._configs) > self.max_projects:
                self._configs.popitem(last=False)

    def get(self, project: str | None) -> LabelConfig | None:
        with self._lock:
            config = self._configs.get(project_key(project))
            if config is not None:
                self._configs.move_to_end(project_key(project))
            return config


class ServiceState:
    """The served model and everything around it; the routes read it, ``create_app``'s lifespan starts it."""

    def __init__(self, settings: Settings) -> None:
        self.training = _training_manager(settings, self)
        if self.training is not None and settings.model_dir == Settings.model_dir:
            served = self.training.served_link
            if served.is_dir():  # the loop promoted before: serve what it promoted
                settings = dataclasses.replace(settings, model_dir=served)
        self.settings = settings
        self.metrics = Metrics()
        runtime = load_runtime(settings.model_dir, settings)
        self.metrics.set_model(runtime.model_version)
        self.batcher = Lanes(runtime, bulk_chars=settings.bulk_chars, max_batch_size=settings.max_batch_size,
                             max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms,
                             on_batch=self.metrics.observe_batch, on_idle=release_memory,
                             on_narrow=self.metrics.observe_shared_core_call)
        self.reloader = ModelReloader(settings.model_dir, self.load, self.batcher,
                                      on_reload=self.metrics.observe_reload)
        self.label_configs = LabelConfigs(settings.max_config_chars)
        self.projects = ProjectConfigs()
        self.ready = False

    @property
    def model_dir(self) -> Path:
        """The folder served now (the registry's ``served`` link once the loop has promoted a model)."""
        return self.reloader.model_dir

    def after_job(self, job: JobStatus) -> None:
        """A training job ended: follow a promotion (switching to the registry's link), record the figures."""
        if job.decision == "promoted" and self.training is not None:
            self.reloader.model_dir = self.training.served_link
            result = self.reloader.check()
            if result.error:
                log.error("job %s promoted %s but it does not load: %s", job.job_id, job.version, result.error)
        served_f1 = (job.candidate if job.decision == "promoted" else job.served) or {}
        self.metrics.observe_job(job.decision or "failed", (job.finished_at or job.started_at) - job.started_at,
                                 served_f1.get("dev_f1"))

    def load(self, model_dir: Path) -> ServingRuntime:
        return load_runtime(model_dir, self.settings)

    @property
    def runtime(self) -> ServingRuntime:
        """The runtime serving now (a reload swaps it between batches)."""
        return self.batcher.runtime

    def check_texts(self, texts: list[str], names: list[str] | None = None) -> None:
        """``/v1/ner``'s limits: count and length (413), valid Unicode (422); ``names[i]`` names text i."""
        if len(texts) > self.settings.max_texts:
            raise HTTPException(status_code=413, detail=f"{len(texts)} texts; at most {self.settings.max_texts} "
                                                        f"per request ({Settings.ENV['max_texts']})")
        self._check_each(texts, names)

    def check_tasks(self, texts: list[str], names: list[str]) -> None:
        """``/predict``'s limits: Label Studio sends a whole selection in one call, so the count is larger."""
        cap = self.settings.max_predict_tasks
        if len(texts) > cap:
            raise HTTPException(status_code=413, detail=f"{len(texts)} tasks; at most {cap} per /predict "
                                                        f"({Settings.ENV['max_predict_tasks']}): select fewer")
        self._check_each(texts, names)

    def _check_each(self, texts: list[str], names: list[str] | None) -> None:
        for i, text in enumerate(texts):
            name = names[i] if names else f"text {i}"
            if len(text) > self.settings.max_chars:
                raise HTTPException(status_code=413, detail=f"{name} has {len(text)} characters; at most "
                                                            f"{self.settings.max_chars}")
            utf8_or_422(text, name)

    async def run(self, texts: list[str]) -> Batched:
        """Predictions for ``texts`` through the micro-batcher (shared with concurrent requests)."""
        if not texts:
            return Batched([], self.runtime.model_version)
        return await self.batcher.submit(texts)

    def labels_or_422(self, config: LabelConfig) -> None:
        """The served model's entity types must map onto the config's labels (422 naming the missing ones)."""
        try:
            check_labels(self.runtime.entity_types, config)
        except LabelConfigMismatch as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None


def _training_manager(settings: Settings, state: ServiceState) -> TrainingManager | None:
    """The labelling loop's job manager, when the loop is on and the service runs in a DVC workspace."""
    if not settings.loop:
        return None
    if not settings.params_file.is_file():
        log.info("labelling loop off: no %s here (run python -m serve from the project folder, or set %s)",
                  settings.params_file, Settings.ENV["params_file"])
        return None
    webhook = None
    if settings.public_url and settings.api_key:
        webhook = Webhook(settings.public_url, settings.api_key)
    return TrainingManager(Path.cwd(), settings.params_file, served_dir=lambda: state.model_dir,
                           on_finish=state.after_job, webhook=webhook)


def service(request: Request) -> ServiceState:
    """FastAPI dependency: the app's :class:`ServiceState`."""
    return request.app.state.service


def project_key(project: str | None) -> str:
    """Label Studio sends ``"<id>.<timestamp>"``; the id is the project."""
    return (project or "").split(".")[0]


def task_texts(tasks: list[dict[str, Any]], data_key: str) -> tuple[list[str], list[str]]:
    """Each task's ``data[data_key]`` and its name for errors (``tasks[3] (id 17): data.text``); 422 if not a str."""
    texts, names = [], []
    for i, task in enumerate(tasks):
        name = f"tasks[{i}]" + (f" (id {printable(task['id'])})" if "id" in task else "") + f": data.{data_key}"
        data = task.get("data")
        text = data.get(data_key) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise HTTPException(status_code=422, detail=f"{name} must be a string")
        texts.append(text)
        names.append(name)
    return texts, names


def load_runtime(model_dir: Path, settings: Settings) -> ServingRuntime:
    """The model folder loaded and warmed up; any refusal is a :class:`ModelLoadError` naming the folder and why."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist ({Settings.ENV['model_dir']}, --model-dir); "
                             "run the export stage first")
    try:
        runtime = ServingRuntime(model_dir, quantized=settings.quantized, threads=settings.ort_threads(),
                                 batch_size=max(1, settings.onnx_batch_size),
                                 spin_after_call=settings.ort_spin_after_call)
        runtime.predict(["warm up"])  # the first ONNX run builds kernels, and shows a graph that does not run
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime, tokenizers and json each raise their own types
        raise ModelLoadError(f"cannot load the model in {model_dir}: {_load_problem(model_dir, exc)}") from exc
    return runtime


def _load_problem(model_dir: Path, exc: Exception) -> str:
    """What is wrong, in one line: a JSON file of the folder that does not parse, else the error's first line."""
    for path in sorted(model_dir.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as bad:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f"{path.name} is not valid JSON ({str(bad).splitlines()[0]})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, KeyError):
        return f"{CRF_FILE} or {INFO_FILE} lacks the entry {text}"
    return f"{type(exc).__name__}: {text}"
