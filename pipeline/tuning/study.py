"""The Optuna study behind ``python -m pipeline tune``: samplers, pruners, the resumable storage and the objective.

Every trial is the real train stage run as a DVC experiment (``pipeline.tuning.trial``); its dev F1 at each
epoch end goes to ``trial.report`` so the pruner can stop it; the objective is the best dev F1 of the run
(the epoch ``models/best`` keeps). The study lives in an RDB storage (a SQLite file by default): running the
command again continues it, with new trial numbers, until it holds ``tune.trials`` finished trials. Optuna is
imported lazily (``pip install ".[tune]"``). Torch-free.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import SearchDim, TuneConfig, number
from pipeline.core.errors import ParamsError, PipelineError
from pipeline.loop.experiment import ExperimentError
from pipeline.tuning.trial import TrialRun, read_metrics, run_trial

log = logging.getLogger(__name__)

#: Trials failing one after another before the study stops (a broken set-up fails every trial the same way).
MAX_FAILURES_IN_A_ROW = 3
#: Seconds between the tuner's heartbeats; a RUNNING trial silent for the grace period (its tuner was killed)
#: is marked failed when the study runs again.
HEARTBEAT_S, GRACE_S = 60, 180


class TuneError(PipelineError):
    """The study cannot run (no Optuna, no DVC project, trials that keep failing)."""


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise TuneError('tune needs Optuna: pip install ".[tune]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the tuner logs each trial itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@dataclass(frozen=True)
class StudySetup:
    """Where and what the study tunes: the DVC project ``root``, its ``train`` section and paths."""

    root: Path
    config: TuneConfig
    train: dict[str, Any]          # the train section of params.yaml: each key's type and the default epochs
    train_live: str                # paths.train_live: the experiment's dvclive/train/metrics.json
    copy_paths: tuple[str, ...]    # git-ignored inputs the temp workspace needs (the encoder folder)
    env: dict[str, str] | None = None
    params_file: str = "params.yaml"  # relative to root; another one (pipelines/msra/params.yaml) tunes its own
                                      # pipeline: the train stage of the dvc.yaml beside it, its keys set there

    def target(self) -> str:
        """The stage a trial runs: ``train`` of dvc.yaml, or of the dvc.yaml beside another params file."""
        folder = Path(self.params_file).parent
        return "train" if folder == Path(".") else f"{(folder / 'dvc.yaml').as_posix()}:train"

    def key(self, name: str) -> str:
        """The ``-S`` key of train param ``name``: ``train.lr_head`` or ``pipelines/msra/params.yaml:train.lr_head``."""
        return f"train.{name}" if self.params_file == "params.yaml" else f"{self.params_file}:train.{name}"

    def distributions(self, optuna: Any) -> dict[str, Any]:
        return {k: distribution(optuna, d, self.train[k]) for k, d in self.config.space.items()}

    def fixed(self) -> dict[str, str]:
        """Overrides every trial gets: with ``tune.jobs`` > 1 trials side by side, each its share of the cores
        (``train.threads``), unless params.yaml sets the threads or the space searches them."""
        jobs = self.config.jobs
        if jobs == 1 or "threads" in self.config.space or number(self.train.get("threads", 0)):
            return {}
        return {self.key("threads"): str(max(1, len(os.sched_getaffinity(0)) // jobs))}


def storage_url(storage: str, root: Path) -> str:
    """``reports/tune.db`` -> ``sqlite:////abs/reports/tune.db`` (folder created); a URL stays as it is."""
    if "://" in storage:
        return storage
    path = (root / storage).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_study(setup: StudySetup) -> Any:
    """Create the study or load it from the storage, with this config's sampler and pruner."""
    optuna, conf = import_optuna(), setup.config
    storage = optuna.storages.RDBStorage(storage_url(conf.storage, setup.root), heartbeat_interval=HEARTBEAT_S,
                                         grace_period=GRACE_S)
    study = optuna.create_study(study_name=conf.study, storage=storage, direction="maximize", load_if_exists=True)
    # seeded by the trials already there, so a resumed study draws new points instead of replaying the first ones
    study.sampler = make_sampler(optuna, conf, seed=conf.seed + len(study.trials))
    study.pruner = make_pruner(optuna, conf, max_epochs(conf, setup.train))
    check_resumable(optuna, study, setup.distributions(optuna))
    return study


def make_sampler(optuna: Any, conf: TuneConfig, seed: int) -> Any:
    if conf.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in conf.space.items()}, seed=seed)
    if conf.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # with trials side by side, the running ones count as scored at their worst so TPE draws elsewhere
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=conf.startup_trials, constant_liar=conf.jobs > 1)


def make_pruner(optuna: Any, conf: TuneConfig, epochs: int) -> Any:
    if conf.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=conf.min_epochs, max_resource=max(epochs, conf.min_epochs))
    if conf.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=conf.startup_trials, n_warmup_steps=conf.min_epochs)
    return optuna.pruners.NopPruner()


def max_epochs(conf: TuneConfig, train: dict[str, Any]) -> int:
    """The most epochs a trial can run: Hyperband's full budget."""
    dim = conf.space.get("epochs")
    if dim is None:
        return int(train["epochs"])
    return int(max(number(c) or 0 for c in dim.choices) if dim.choices else dim.high)


def distribution(optuna: Any, dim: SearchDim, current: Any) -> Any:
    """The Optuna distribution of one key: ints where params.yaml holds an int."""
    dists = optuna.distributions
    if dim.choices is not None:
        return dists.CategoricalDistribution(list(dim.choices))
    if isinstance(number(current), int):
        return dists.IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return dists.FloatDistribution(float(dim.low), float(dim.high), log=dim.log, step=dim.step)


def suggest(trial: Any, key: str, dist: Any) -> Any:
    if hasattr(dist, "choices"):
        return trial.suggest_categorical(key, list(dist.choices))
    if isinstance(dist.low, int):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def check_resumable(optuna: Any, study: Any, space: dict[str, Any]) -> None:
    """A resumed study keeps each key's kind, scale and choices (Optuna refuses a change mid-trial)."""
    for trial in study.trials:
        for key, old in trial.distributions.items():
            if key in space:
                try:
                    optuna.distributions.check_distribution_compatibility(old, space[key])
                except ValueError as exc:
                    raise ParamsError(f"tune.space.{key}: the study {study.study_name} holds it as {old} ({exc}); "
                                      "keep its kind, log scale and choices, or choose another tune.study") from None


def override(value: Any) -> str:
    """A value as ``dvc exp run -S`` reads it (Hydra grammar): exact floats, lower-case booleans."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def run_study(setup: StudySetup, on_trial: Callable[[Any], None] | None = None) -> Any:
    """Run trials until the study holds ``tune.trials`` finished ones (or ``tune.timeout`` passes); the study.

    ``on_trial(study)`` runs after every trial (the report). A trial that fails is recorded FAIL and the study
    goes on, unless ``MAX_FAILURES_IN_A_ROW`` fail one after another. ``tune.jobs`` trials run at once (Optuna's
    worker threads; each trial's training is a process of its own).
    """
    optuna, conf = import_optuna(), setup.config
    if not (setup.root / ".dvc").is_dir():
        raise TuneError(f"{setup.root}: not a DVC project (no .dvc/): tune runs its trials as DVC experiments")
    study = open_study(setup)
    done = finished(study)
    left = conf.trials - done
    if left <= 0:
        log.info("study %s holds %d finished trials already (tune.trials: %d): raise it to run more",
                 conf.study, done, conf.trials)
        return study
    log.info("study %s: %d finished trials, running %d more, %d at once (sampler %s, pruner %s, storage %s)",
             conf.study, done, left, conf.jobs, conf.sampler, conf.pruner, conf.storage)
    failures: list[str] = []
    lock = threading.Lock()  # trials end in worker threads: one report at a time

    def after(study: Any, frozen: Any) -> None:
        with lock:
            if frozen.state.name == "FAIL":
                failures.append(str(frozen.user_attrs.get("error", "interrupted")))
            else:
                failures.clear()
            if len(failures) >= MAX_FAILURES_IN_A_ROW:
                study.stop()
            if on_trial:
                on_trial(study)

    objective = Objective(setup, optuna, total=conf.trials)
    study.optimize(objective, n_trials=left, timeout=conf.timeout or None, n_jobs=conf.jobs,
                   catch=(ExperimentError,), callbacks=[after])
    if len(failures) >= MAX_FAILURES_IN_A_ROW:
        raise TuneError(f"{len(failures)} trials failed in a row; the last: {failures[-1]}")
    return study


def finished(study: Any) -> int:
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


class Objective:
    """One trial: suggest the params, run the experiment, report each epoch, return the best dev F1."""

    def __init__(self, setup: StudySetup, optuna: Any, total: int) -> None:
        self.setup, self.optuna, self.total = setup, optuna, total
        self.distributions = setup.distributions(optuna)

    def __call__(self, trial: Any) -> float:
        setup = self.setup
        values = {k: suggest(trial, k, d) for k, d in self.distributions.items()}
        name = f"{setup.config.study}-{trial.number}"
        trial.set_user_attr("experiment", name)
        epochs = int(values.get("epochs", setup.train["epochs"]))
        log.info("trial %d (of %d): %s %s", trial.number, self.total, name,
                 " ".join(f"{k}={_short(v)}" for k, v in values.items()))
        started, seen = time.monotonic(), []

        def on_epoch(epoch: int, f1: float) -> bool:
            seen.append(f1)
            trial.set_user_attr("dev_f1_per_epoch", seen)
            # the pruner sees the best dev F1 so far, as the objective (the stage keeps its best epoch): judged on
            # its latest epoch, the sample's study pruned a trial at 0.573 whose 0.600 the epoch before led them all
            trial.report(max(seen), epoch)
            stop = epoch < epochs and trial.should_prune()  # the last epoch ends the run anyway
            log.info("trial %d epoch %d/%d: dev F1 %.4f%s", trial.number, epoch, epochs, f1,
                     ", pruned" if stop else "")
            return stop

        run = TrialRun(setup.root, name, {setup.key(k): override(v) for k, v in values.items()} | setup.fixed(),
                       copy_paths=setup.copy_paths, targets=(setup.target(),), env=setup.env)
        try:
            commit = run_trial(run, on_epoch)
        except ExperimentError as exc:
            trial.set_user_attr("error", str(exc)[-500:])
            log.error("trial %d failed: %s", trial.number, exc)
            raise
        minutes = (time.monotonic() - started) / 60
        if commit is None:
            log.info("trial %d pruned after %d epochs (%.1f min)", trial.number, len(seen), minutes)
            raise self.optuna.TrialPruned(f"pruned at epoch {len(seen)}")
        trial.set_user_attr("commit", commit)
        value = read_metrics(setup.root, commit, f"{setup.train_live}/metrics.json").get("best_dev_f1")
        value = float(value if value is not None else max(seen, default=0.0))
        log.info("trial %d: best dev F1 %.4f (%.1f min), experiment %s", trial.number, value, minutes, name)
        return value


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
