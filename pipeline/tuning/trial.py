"""One tuning trial: the train stage as a DVC experiment, followed epoch by epoch, stopped when it is pruned.

    python -m dvc exp run --temp train --name <study>-<n> -S train.<key>=<value> ... [-C <git-ignored encoder>]

``--temp`` runs in a copy under ``.dvc/tmp/exps`` (the user's params.yaml, dvc.lock and models/ are never
touched); the target ``train`` reproduces only convert (skipped when unchanged) and train. The tuner reads the
line the train stage logs at each epoch end (``EPOCH_LINE``, the one the labelling loop reads too) and hands
the dev F1 to ``on_epoch``; when that says stop, the processes DVC started for the stage get SIGKILL: DVC sees
the stage fail, records nothing (no experiment ref, no dvc.lock, and the
train stage never enters the run cache: its ``persist`` checkpoint folder rules that out) and removes its
temp copy. So a pruned trial leaves no truncated model that ``dvc exp apply``, ``dvc repro`` or a later
``dvc exp run`` could pick up. Trials may run side by side (``tune.jobs``, the cores split between them):
``RUNNING`` knows their experiments, so an interrupted tuner stops them all (``RUNNING.stop_all()``). Torch-free:
training happens in the stage process DVC starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.loop.experiment import EPOCH_LINE, ExperimentError, dvc, dvc_env, experiment_commit

log = logging.getLogger(__name__)

#: Seconds a stopped experiment gets to exit on SIGINT before its process group is killed.
STOP_GRACE_S = 60


class RunningExperiments:
    """The DVC processes of the trials running now (several with ``tune.jobs`` > 1)."""

    def __init__(self) -> None:
        self._pids: set[int] = set()
        self._lock = threading.Lock()
        self.interrupted = False

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids.add(pid)

    def discard(self, pid: int) -> None:
        with self._lock:
            self._pids.discard(pid)

    def stop_all(self) -> None:
        """Stop every running experiment's stage (the tuner was interrupted): their trials end as failed."""
        with self._lock:
            self.interrupted = True
            pids = list(self._pids)
        for pid in pids:
            _kill_stage(pid)


#: One per process, as signals are: the tune command's SIGINT/SIGTERM handler calls ``RUNNING.stop_all()``
#: before it raises, since Optuna's worker threads never see the interrupt (their trials would run to the end).
RUNNING = RunningExperiments()


@dataclass(frozen=True)
class TrialRun:
    """What one trial runs: experiment ``name`` in ``root`` with ``overrides`` (``{"train.lr_head": "0.001"}``)."""

    root: Path
    name: str
    overrides: dict[str, str]
    copy_paths: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("train",)
    env: dict[str, str] | None = field(default=None, compare=False)

    def command(self) -> list[str]:
        cmd = dvc("exp", "run", "--temp", "--name", self.name, *self.targets)
        for key, value in self.overrides.items():
            cmd += ["-S", f"{key}={value}"]
        for path in self.copy_paths:
            cmd += ["-C", path]
        return cmd


def run_trial(run: TrialRun, on_epoch: Callable[[int, float], bool]) -> str | None:
    """Run the experiment; ``on_epoch(epoch, dev_f1)`` returning True stops it.

    Returns the experiment's commit, or None when it was stopped before it finished. A run that fails on its
    own raises ``ExperimentError`` with its last lines.
    """
    if _exists(run.root, run.name):
        raise ExperimentError(f"experiment {run.name} exists already (from a study of the same name whose storage "
                              f"is gone?): dvc exp remove {run.name}, or choose another tune.study")
    if RUNNING.interrupted:
        raise ExperimentError(f"dvc exp run {run.name}: not started, the tuner was interrupted")
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen(run.command(), cwd=run.root, env=dvc_env(run.env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    RUNNING.add(proc.pid)
    killer = threading.Timer(STOP_GRACE_S, _signal_group, (proc, signal.SIGKILL))
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            _kill_stage(proc.pid)
            killer.start()

    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            tail.append(line)
            log.debug("%s", line)
            epoch = EPOCH_LINE.search(line)
            if epoch and not stopped and on_epoch(int(epoch.group(1)), float(epoch.group(3))):
                stop()
        proc.wait()
    except BaseException:  # the tuner itself interrupted (Ctrl-C, SIGTERM): the experiment stops with it
        stop()
        proc.wait()
        raise
    finally:
        RUNNING.discard(proc.pid)
        killer.cancel()
        proc.stdout.close()  # type: ignore[union-attr]
    if proc.returncode == 0 or (stopped and _exists(run.root, run.name)):  # finished before the signal landed
        return experiment_commit(run.root, run.name)
    if stopped:
        return None
    if RUNNING.interrupted:
        raise ExperimentError(f"dvc exp run {run.name}: stopped, the tuner was interrupted")
    raise ExperimentError(f"dvc exp run {run.name} exited {proc.returncode}: " + " | ".join(
        t.strip() for t in list(tail)[-8:] if t.strip()))


def _kill_stage(dvc_pid: int) -> None:
    """SIGKILL the processes DVC started (the stage's shell and python): DVC sees the stage fail, records nothing
    and removes its temp copy. (SIGINT is not enough: a stage saving or training may not stop for a minute.)"""
    for pid in descendants(dvc_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...), from ``/proc``."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _exists(root: Path, name: str) -> bool:
    try:
        experiment_commit(root, name)
    except ExperimentError:
        return False
    return True


def read_metrics(root: Path, commit: str, path: str) -> dict:
    """A metrics file (``dvclive/train/metrics.json``: git-tracked, ``cache: false``) as commit ``commit`` holds it."""
    proc = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExperimentError(f"experiment {commit[:8]} has no {path}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)
