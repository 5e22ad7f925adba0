"""One training job of the labelling loop, start to finish, in its own process (``python -m pipeline loop-job``).

    snapshot   the project's export and label config through the SDK (the code of ``pipeline pull``), kept
               content-addressed under ``<loop_dir>/snapshots/<hash>/`` and never rewritten
    train      the DVC pipeline on the snapshot as DVC experiment ``loop-<project>-<job>`` (``dvc exp show``)
    score      the candidate and the served model on the experiment's new held-out split, by the serving runtime
    gate       ``pipeline.loop.gate.decide`` with ``loop.min_gain`` and ``loop.max_test_drop``
    promote    the candidate copied in as a new registry version (never over one), the served link swapped
    repredict  the unlabeled tasks' predictions of the experiment (made by the candidate, scored by
               ``predict.uncertainty``) pushed to the project, exactly once per task and version

What the job is doing and how it ended is in ``<job_dir>/status.json`` (rewritten atomically at each step),
which the service reads for ``GET /v1/training``. It never holds a secret: the Label Studio URL and key come
from the environment of the process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.config import LoopConfig, PushConfig
from pipeline.core.errors import PipelineError
from pipeline.labelstudio.client import LabelStudioClient
from pipeline.labelstudio.push import push
from pipeline.labelstudio.shards import Predictions, file_sha256
from pipeline.loop.experiment import EPOCH_LINE, STAGE_LINE, fetch_output, read_params, run_experiment
from pipeline.loop.gate import decide
from pipeline.loop.registry import Registry
from pipeline.loop.scoring import score_model
from pipeline.runtime.inference import INFO_FILE

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


@dataclass
class JobStatus:
    """What ``GET /v1/training`` shows of one job; ``state`` is running, promoted, rejected, failed or interrupted."""

    job_id: str
    project: int
    reason: str                      # what started it: "START_TRAINING", "12 new annotations", ...
    state: str = "running"
    stage: str = "queued"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    epoch: int | None = None
    dev_f1_so_far: float | None = None
    experiment: str | None = None
    warm_from: str | None = None     # the served version whose weights the candidate started from (loop.warm_start)
    commit: str | None = None
    data_hash: str | None = None
    candidate: dict[str, float] | None = None
    served: dict[str, float] | None = None
    served_version: str | None = None
    version: str | None = None       # the version served after the job (the candidate's if promoted)
    decision: str | None = None      # promoted | rejected | failed | interrupted
    detail: str | None = None        # the gate's reason, or the failure's cause
    pushed: dict[str, int] | None = None
    timeline: dict[str, float] = field(default_factory=dict)  # seconds from the start to each step's start
    pid: int | None = None

    @classmethod
    def read(cls, job_dir: str | Path) -> JobStatus:
        data = json.loads((Path(job_dir) / STATUS_FILE).read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def write(self, job_dir: str | Path) -> None:
        write_json(Path(job_dir) / STATUS_FILE, asdict(self))

    def finish(self, decision: str, detail: str) -> None:
        self.timeline["done"] = round(time.time() - self.started_at, 1)
        self.state = self.decision = decision
        self.detail, self.stage, self.finished_at = detail, "done", time.time()


@dataclass(frozen=True)
class JobPaths:
    """Where one job reads and writes, inside the DVC workspace ``root``."""

    root: Path
    loop_dir: Path      # relative to root: snapshots/ and jobs/
    registry_dir: Path  # relative to root: registry.json, versions/, served
    job_id: str
    model_dir: Path = Path("models/best")  # the workspace's trained model (paths.model_dir)...
    onnx_dir: Path = Path("models/onnx")   # ...and its export (paths.onnx_dir): a warm start's weights
    encoder: Path | None = None            # paths.encoder: copied into the experiment if it is not in git

    @property
    def job_dir(self) -> Path:
        return self.root / self.loop_dir / "jobs" / self.job_id

    def snapshot_dir(self, digest: str) -> Path:
        return self.loop_dir / "snapshots" / digest  # relative: a DVC param and a -C path


def run_job(paths: JobPaths, status: JobStatus, conf: LoopConfig, push_conf: PushConfig,
            client: LabelStudioClient, served_dir: Path | None) -> JobStatus:
    """Run every step; any failure ends the job as ``failed`` with its cause, and the served model stays.

    ``served_dir`` is the model folder the service serves now (None: nothing yet): the candidate must beat it.
    """
    job_dir = paths.job_dir
    job_dir.mkdir(parents=True, exist_ok=True)
    status.pid = os.getpid()

    def step(stage: str) -> None:
        status.stage = stage
        status.timeline[stage] = round(time.time() - status.started_at, 1)
        status.write(job_dir)
        log.info("job %s: %s", status.job_id, stage)

    try:
        step("snapshot")
        snapshot = take_snapshot(client, status.project, paths)
        status.data_hash = snapshot.name
        step("train")
        _train(paths, status, conf, snapshot, served_dir)
        outputs = read_params(paths.root, status.commit)["paths"]  # where the experiment wrote its outputs
        step("score")
        candidate_dir = _score(paths, status, served_dir, outputs)
        step("gate")
        decision = decide(status.candidate, status.served, min_gain=conf.min_gain, max_test_drop=conf.max_test_drop)
        if not decision.promote:
            status.version = status.served_version
            status.finish("rejected", decision.reason)
            return status
        step("promote")
        _register(Registry(paths.root / paths.registry_dir), candidate_dir, status, decision.reason)
    except (PipelineError, OSError, ValueError, KeyError) as exc:
        log.error("job %s failed at %s: %s", status.job_id, status.stage, exc)
        status.finish("failed", f"{status.stage}: {exc}")
        return status
    finally:
        status.write(job_dir)
    detail = decision.reason
    if conf.repredict:  # the new model serves already: a push that fails is said, the promotion stands
        step("repredict")
        try:
            status.pushed = _repredict(paths, status, client, push_conf, outputs)
        except (PipelineError, OSError, ValueError, KeyError) as exc:
            log.error("job %s: re-predicting failed: %s", status.job_id, exc)
            detail += f"; re-predicting the unlabeled tasks failed ({exc}): run python -m pipeline push"
    status.finish("promoted", detail)
    status.write(job_dir)
    return status


def _train(paths: JobPaths, status: JobStatus, conf: LoopConfig, snapshot: Path, served_dir: Path | None) -> None:
    """The DVC experiment on the snapshot, warm-started from the served weights when ``loop.warm_start``."""
    status.experiment = f"loop-{status.project}-{status.job_id}"
    overrides, copy = _overrides(snapshot, status.experiment), [snapshot.as_posix()]
    if paths.encoder is not None and not paths.encoder.is_absolute() and (paths.root / paths.encoder).exists():
        copy.append(paths.encoder.as_posix())  # pretrained/ is git-ignored: the temp workspace would lack it
    if conf.warm_start:
        init = _warm_start_weights(paths, served_dir, status)
        if init is not None:
            status.warm_from = init.name
            overrides |= {"train.init_from": init.as_posix(), "train.epochs": str(conf.warm_epochs)}
            copy.append(init.as_posix())
    status.commit = run_experiment(paths.root, status.experiment, overrides, copy_paths=copy,
                                   on_line=lambda line: _progress(line, status, paths.job_dir))


def _score(paths: JobPaths, status: JobStatus, served_dir: Path | None, outputs: dict[str, str]) -> Path:
    """Candidate and served model on the experiment's split, by the serving runtime; the candidate's folder."""
    candidate_dir, conll_dir = _fetch_candidate(paths, status, outputs)
    status.candidate = score_model(candidate_dir, conll_dir)
    if served_dir is not None:
        status.served_version = _version_of(served_dir)
        status.served = score_model(served_dir, conll_dir)
    return candidate_dir


def take_snapshot(client: LabelStudioClient, project: int, paths: JobPaths) -> Path:
    """The project's export and label config in ``snapshots/<hash>/`` (relative to root); one folder per content."""
    staging = paths.job_dir / "snapshot"
    staging.mkdir(parents=True, exist_ok=True)
    client.export_snapshot(project, staging / "export.json")
    (staging / "label_config.xml").write_text(client.label_config_xml(project).rstrip("\n") + "\n",
                                              encoding="utf-8")
    digest = hashlib.sha256("".join(file_sha256(staging / n) for n in ("export.json", "label_config.xml")).encode())
    relative = paths.snapshot_dir(digest.hexdigest()[:16])
    if not (paths.root / relative).is_dir():
        with atomic_dir(paths.root / relative) as tmp:
            for name in ("export.json", "label_config.xml"):
                shutil.move(staging / name, tmp / name)
    shutil.rmtree(staging, ignore_errors=True)
    return relative


def _overrides(snapshot: Path, experiment: str) -> dict[str, str]:
    """Params of the experiment: the snapshot as input; its predictions carry the experiment's name as version."""
    return {"paths.export": (snapshot / "export.json").as_posix(),
            "paths.label_config": (snapshot / "label_config.xml").as_posix(),
            "predict.model_version": experiment}


def _warm_start_weights(paths: JobPaths, served_dir: Path | None, status: JobStatus) -> Path | None:
    """The served model's trained (torch) weights for ``train.init_from``, relative to root; None: start cold.

    A version the loop promoted has them in its experiment (read from the DVC cache once, into
    ``warm/<version>/``); the model ``dvc repro`` exported in the workspace has them in ``paths.model_dir``.
    """
    if served_dir is None:
        return None
    version = _version_of(served_dir)
    relative = paths.loop_dir / "warm" / version
    if (paths.root / relative).is_dir():
        return relative
    entry = next((e for e in Registry(paths.root / paths.registry_dir).versions() if e["version"] == version), None)
    params = read_params(paths.root, entry["commit"]) if entry and entry.get("commit") else None
    if params is not None:
        fetch_output(paths.root, entry["commit"], params["paths"]["model_dir"], paths.root / relative)
        return relative
    exported, trained = paths.root / paths.onnx_dir, paths.root / paths.model_dir
    if (exported / INFO_FILE).is_file() and _version_of(exported) == version and trained.is_dir():
        shutil.copytree(trained, paths.root / relative)
        return relative
    status.detail = f"warm start: no trained weights of the served {version}; trained from the encoder"
    log.warning("%s", status.detail)
    return None


def _progress(line: str, status: JobStatus, job_dir: Path) -> None:
    """Stage and epoch lines of the experiment's output into the status file."""
    log.debug("%s", line)
    stage, epoch = STAGE_LINE.search(line), EPOCH_LINE.search(line)
    if stage:
        status.stage = f"train/{stage.group(1)}"
    elif epoch:
        status.epoch, status.dev_f1_so_far = int(epoch.group(1)), float(epoch.group(3))
    else:
        return
    status.write(job_dir)


def _fetch_candidate(paths: JobPaths, status: JobStatus, outputs: dict[str, str]) -> tuple[Path, Path]:
    """The experiment's exported model and CoNLL split, out of the DVC cache into the job folder."""
    job_dir = paths.job_dir
    model = fetch_output(paths.root, status.commit, outputs["onnx_dir"], job_dir / "candidate")
    conll = fetch_output(paths.root, status.commit, outputs["conll_dir"], job_dir / "conll")
    info_path = model / INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info.update(model_version=status.experiment, experiment=status.experiment, commit=status.commit)
    info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return model, conll


def _version_of(model_dir: Path) -> str:
    return json.loads((model_dir / INFO_FILE).read_text(encoding="utf-8"))["model_version"]


def _register(registry: Registry, candidate_dir: Path, status: JobStatus, reason: str) -> None:
    """The candidate as a new version, then served (the service's reloader follows the link)."""
    assert status.candidate is not None  # noqa: S101 - scored before the gate
    registry.add(candidate_dir, {
        "version": status.experiment, "experiment": status.experiment, "commit": status.commit,
        "data_hash": status.data_hash, "dev_f1": status.candidate["dev_f1"], "test_f1": status.candidate["test_f1"],
        "source": f"loop job {status.job_id} ({status.reason})"})
    registry.promote(status.experiment, reason=reason)
    status.version = status.experiment


def _repredict(paths: JobPaths, status: JobStatus, client: LabelStudioClient, push_conf: PushConfig,
               outputs: dict[str, str]) -> dict[str, int]:
    """Push the experiment's predictions of the unlabeled tasks (same ids: the snapshot is of this project)."""
    predictions = fetch_output(paths.root, status.commit, outputs["predictions"],
                               paths.job_dir / "predictions")  # a folder of shards (or one file), streamed
    tasks = Predictions(predictions)
    options = push_conf.model_copy(update={"mode": "attach", "match": "id"})
    summary = push(client, status.project, tasks, options, state_path=paths.job_dir / "push_state.jsonl")
    if summary.failed:
        raise PipelineError(f"{len(summary.failed)} predictions could not be pushed: {summary.failed[0]['reason']}")
    return {"created": summary.created, "skipped_existing": summary.skipped_existing}
