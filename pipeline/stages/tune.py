"""The tune command (not a DVC stage): an Optuna study over the train params, each trial a DVC experiment.

``main()`` reads the ``tune`` section once and calls the tuning layer with plain values.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

from pipeline.core.config import TuneConfig
from pipeline.core.errors import ParamsError
from pipeline.tuning.report import apply_command, best_trial, write_plots, write_report
from pipeline.tuning.study import StudySetup, run_study
from pipeline.tuning.trial import RUNNING

log = logging.getLogger(__name__)


def main(params: dict[str, Any], trials: int | None = None, timeout: int | None = None,
         params_file: str = "params.yaml") -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the running experiments stop with the tuner
        signal.signal(sig, _interrupt)
    conf = TuneConfig.from_params(params)
    conf = conf.model_copy(update={k: v for k, v in (("trials", trials), ("timeout", timeout)) if v is not None})
    paths, root = params["paths"], Path.cwd()
    missing = [k for k in ("tune_report", "tune_trials", "tune_plots", "train_live", "encoder") if k not in paths]
    if missing:
        raise ParamsError(f"paths.{missing[0]}: missing (tune writes and reads there)")
    params_path = Path(params_file).resolve()
    if not params_path.is_relative_to(root.resolve()):
        raise ParamsError(f"{params_file}: tune runs DVC experiments of this project, so its params file must be "
                          f"inside {root}")
    setup = StudySetup(root, conf, dict(params["train"]), paths["train_live"],
                       copy_paths=_ignored(root, paths["encoder"]),
                       params_file=params_path.relative_to(root.resolve()).as_posix())

    def report(study: Any) -> None:
        write_report(study, conf, paths["tune_report"], paths["tune_trials"])

    study = run_study(setup, on_trial=report)
    report(study)
    plots = write_plots(study, paths["tune_plots"])
    log.info("wrote %s, %s and %d plots in %s", paths["tune_report"], paths["tune_trials"], len(plots),
             paths["tune_plots"])
    best = best_trial(study)
    if best is None:
        log.info("no trial has finished yet: nothing to apply")
        return
    log.info("best: trial %d, dev F1 %.4f; apply it with: %s", best.number, best.value, apply_command(best))


def _ignored(root: Path, encoder: str) -> tuple[str, ...]:
    """The encoder folder when git ignores it (the default ``pretrained/``): the temp workspace needs a copy."""
    path = Path(encoder)
    if path.is_absolute() or not (root / path).exists():
        return ()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=root).returncode == 0
    return (path.as_posix(),) if ignored else ()


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: stop every running trial's experiment first (trials side by side run in Optuna's worker
    threads, which never see the interrupt), then unwind."""
    RUNNING.stop_all()
    raise KeyboardInterrupt
