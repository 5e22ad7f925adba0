"""`dvc repro` keeps its promise when a stage fails or is killed: the old outputs stay, or come back.

DVC deletes a stage's outputs before it runs the command. convert and predict mark theirs ``persist`` and
swap new ones in atomically, so a failure keeps the last good files; the slow stages keep DVC's run cache,
and ``dvc checkout`` brings back what ``dvc.lock`` records (it changes only when a stage succeeds). Every
command runs as a user's fresh shell would: ``.venv/bin/dvc``, with the virtualenv not on PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.labelstudio.shards import work_dir
from pipeline.tuning.trial import descendants
from tests.conftest import VENV_BIN, run
from tests.test_readme import command, fresh_shell

pytestmark = pytest.mark.slow


@pytest.fixture
def project(pipeline_run, tmp_path):
    """A private copy of the project that `dvc repro` has run (git, DVC cache and all), and its env."""
    root = tmp_path / "project"
    shutil.copytree(pipeline_run.root, root, symlinks=True)
    (root / ".venv").symlink_to(VENV_BIN.parent)
    (root / ".gitignore").write_text("__pycache__/\n.venv\n")
    run(["git", "add", "-A"], root, pipeline_run.env)  # as the project commits dvc.lock and its metric files
    run(["git", "commit", "-qm", "outputs of dvc repro"], root, pipeline_run.env)
    return root, fresh_shell(pipeline_run.env), pipeline_run.params["paths"]


def snapshot(root: Path, *paths: str) -> dict[str, bytes]:
    files = {}
    for rel in paths:
        path = root / rel
        for f in sorted(path.rglob("*") if path.is_dir() else [path]):
            if f.is_file():
                files[str(f.relative_to(root))] = f.read_bytes()
    assert files, f"nothing under {paths}"
    return files


def dvc(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([".venv/bin/dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)


def test_a_bad_export_under_dvc_repro_keeps_the_last_conll_and_report(project):
    root, env, paths = project
    before = snapshot(root, paths["conll_dir"], paths["convert_report"])
    (root / paths["export"]).write_text('[{"id": 1, "data": {"text": "Paris"}, "annotations": [', encoding="utf-8")

    proc = dvc(root, env, "repro", "convert")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(root, paths["conll_dir"], paths["convert_report"]) == before


def predict_command_alive(dvc_pid: int) -> bool:
    """Whether the stage command ``python -m pipeline predict`` that DVC started is running."""
    for pid in descendants(dvc_pid):
        try:
            if b"pipeline\0predict" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_kill_9_of_dvc_repro_predict_keeps_the_last_predictions(project):
    root, env, paths = project
    before = snapshot(root, paths["predictions"])
    work = work_dir(root / paths["predictions"])
    log = root.parent / "repro.log"  # a file, not a pipe: nothing blocks on a full pipe while the test waits
    with log.open("w") as out:
        proc = subprocess.Popen([".venv/bin/dvc", "repro", "-f", "predict"], cwd=root, env=env, text=True,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    # kill while predict is writing: its command alive, a shard in its work folder. Not after a fixed sleep: on the
    # tiny test model the command takes well under a second, and a kill while DVC rewrites dvc.lock (in place) is
    # the other case, which the README covers with `git checkout -- dvc.lock`
    while proc.poll() is None and "Running stage 'predict'" not in log.read_text():
        time.sleep(0.05)  # DVC has removed non-persistent outputs by the time it names the stage
    mid_write = False
    while proc.poll() is None and not mid_write:
        mid_write = predict_command_alive(proc.pid) and work.is_dir() and any(work.iterdir())
        if not mid_write:
            time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert mid_write, "predict finished before it could be killed mid-write:\n" + log.read_text()
    assert snapshot(root, paths["predictions"]) == before

    # run it again from the same fresh shell: it completes. Forced, because the killed run left the outputs as they
    # were, so a plain repro may skip the stage, and then the killed run's resumable .partial folder stays by design
    again = dvc(root, env, "repro", "-f", "predict")
    assert again.returncode == 0, again.stdout + again.stderr
    assert snapshot(root, paths["predictions"]) == before  # same model, same tasks: same shards and manifest
    assert not work.exists()


def test_after_a_failed_train_dvc_checkout_brings_the_last_model_back(project):
    root, env, paths = project
    before = snapshot(root, paths["model_dir"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["precision"] = "fp16"  # needs CUDA: the stage refuses at start
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    failed = dvc(root, env, "repro", "train")
    assert failed.returncode != 0 and "fp16 needs a CUDA device" in failed.stdout + failed.stderr
    assert not (root / paths["model_dir"]).exists()  # DVC removed it before the command ran

    run(["git", "checkout", "--", "params.yaml"], root, env)
    restored = subprocess.run(["bash", "-c", command(r"git checkout -- dvclive")], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)  # the README's recovery command
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert snapshot(root, paths["model_dir"]) == before
    status = dvc(root, env, "status")
    assert status.returncode == 0 and "changed outs" not in status.stdout, status.stdout
