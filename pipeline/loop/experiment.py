"""The DVC pipeline run on a project snapshot as a DVC experiment, and its outputs read back from the cache.

``dvc exp run --temp`` runs ``dvc.yaml`` in a temporary copy of the workspace (the user's files are never
touched), with ``-S`` overrides pointing ``paths.export`` and ``paths.label_config`` at the snapshot and ``-C``
copying the snapshot in. The experiment is a git ref: ``dvc exp show`` lists it with its params and metrics,
``dvc exp apply NAME`` brings it into the workspace. Its outputs (the exported model, the CoNLL split, the
predictions) live in the DVC cache and are read back with ``dvc get . PATH --rev SHA``.

DVC runs as ``python -m dvc`` of this interpreter, and this interpreter's folder goes first on its PATH so that
the stages' ``python`` is this one too (:func:`dvc_env`). Torch-free: training happens in the stage processes
DVC starts.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

#: What the train stage logs at each epoch end (pipeline.modeling.train): progress for ``/v1/training``.
EPOCH_LINE = re.compile(r"epoch (\d+): train loss ([0-9.naninf]+), dev F1 ([0-9.]+)")
STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")


class ExperimentError(PipelineError):
    """``dvc exp run`` failed; the message carries the last lines it printed."""


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def dvc_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``dvc`` process: ``env`` (None: this process's) with this interpreter's folder
    first on PATH.

    DVC starts a stage's ``cmd`` (``python -m pipeline train``) with the ``python`` that PATH finds, and a
    ``--temp`` workspace has no ``.venv`` of its own for ``pipeline.core.interpreter`` to fall back to: without
    this, ``.venv/bin/python -m pipeline tune`` or ``.venv/bin/python -m serve`` started from a shell without
    the virtualenv on PATH would train with the system interpreter (and stop, as it lacks torch).
    """
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join(part for part in (str(Path(sys.executable).parent), env.get("PATH")) if part)
    return env


def run_experiment(root: str | Path, name: str, overrides: dict[str, Any], copy_paths: Iterable[str] = (),
                   on_line: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> str:
    """Run the pipeline as experiment ``name`` in a temp workspace; return the experiment's commit.

    ``overrides`` are params (``{"paths.export": ...}``); ``copy_paths`` are untracked files the run needs.
    Every line DVC and the stages print goes to ``on_line`` (progress), the last ones into the error.
    """
    cmd = dvc("exp", "run", "--temp", "--name", name)
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={value}"]
    for path in copy_paths:
        cmd += ["-C", str(path)]
    tail: list[str] = []
    with subprocess.Popen(cmd, cwd=root, env=dvc_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None  # noqa: S101 - set by stdout=PIPE
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-30:]
            if on_line:
                on_line(line)
    if proc.returncode != 0:
        raise ExperimentError(f"dvc exp run {name} exited {proc.returncode}: " + " | ".join(
            t.strip() for t in tail[-8:] if t.strip()))
    return experiment_commit(root, name)


def experiment_commit(root: str | Path, name: str) -> str:
    """The commit of experiment ``name`` (its git ref ``refs/exps/.../NAME``)."""
    refs = _git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
    for line in refs:
        sha, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == name:
            return sha
    raise ExperimentError(f"experiment {name} ran but no git ref refs/exps/.../{name} exists")


def fetch_output(root: str | Path, rev: str, path: str, dest: str | Path) -> Path:
    """Copy an output of commit ``rev`` (a file or folder tracked in its ``dvc.lock``) out of the cache."""
    dest = Path(dest)
    proc = subprocess.run(dvc("get", ".", path, "--rev", rev, "-o", str(dest), "--force"), cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not dest.exists():
        raise ExperimentError(f"dvc get {path} at {rev[:8]} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return dest


def _git(root: str | Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExperimentError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip()}")
    return proc.stdout


def read_params(root: str | Path, rev: str) -> dict[str, Any]:
    """``params.yaml`` as commit ``rev`` (an experiment) holds it: its paths and its overrides."""
    import yaml

    return yaml.safe_load(_git(root, "show", f"{rev}:params.yaml"))
