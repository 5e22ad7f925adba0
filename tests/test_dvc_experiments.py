"""Hyperparameter sweeps through DVC, as README documents them: queue with -S, run with `dvc queue start`."""

import json
import shutil
import time

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow


def experiments(show: list) -> dict[str, dict]:
    """name -> data of every experiment in `dvc exp show --json` output (DVC 3 layout)."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict) and "params" in node["data"]:
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(show)
    return found


def test_queued_sweep_runs_each_setting_and_records_params_and_metrics(pipeline_run, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(pipeline_run.root, root, symlinks=True)
    env = pipeline_run.env
    # as in the real project, the encoder sits in the git-ignored pretrained/: queued copies need -C for it
    shutil.copytree(pipeline_run.params["paths"]["encoder"], root / "pretrained" / "tiny")
    with (root / ".gitignore").open("a") as fh:
        fh.write("/pretrained/\n")
    params_file = root / "params.yaml"
    params_file.write_text(params_file.read_text().replace(str(pipeline_run.params["paths"]["encoder"]),
                                                           "pretrained/tiny"))
    assert "encoder: pretrained/tiny" in params_file.read_text()
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "pipeline run"], root, env)  # queued runs start from the last commit
    assert "pretrained/tiny" not in run(["git", "ls-files"], root, env).stdout
    rates = {"lr-high": 2e-3, "lr-low": 1e-4}
    for name, rate in rates.items():
        run(["dvc", "exp", "run", "--queue", "-C", "pretrained", "-n", name, "-S", f"train.lr_encoder={rate}"],
            root, env)
    run(["dvc", "queue", "start", "-j", "1"], root, env)
    try:
        deadline = time.monotonic() + 1200
        while True:
            status = run(["dvc", "queue", "status"], root, env).stdout
            if "Queued" not in status and "Running" not in status:
                break
            assert time.monotonic() < deadline, status
            time.sleep(5)
    finally:
        run(["dvc", "queue", "stop"], root, env)
    assert status.count("Success") == 2, status

    found = experiments(json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout))
    for name, rate in rates.items():
        assert name in found, sorted(found)
        params = found[name]["params"]["params.yaml"]["data"]
        assert params["train"]["lr_encoder"] == rate
        metrics = found[name]["metrics"]["metrics/eval.json"]["data"]["test"]
        assert 0.0 <= metrics["f1"] <= 1.0
    # each setting really trained with its own rate: the higher one fits the training data faster
    loss = {name: found[name]["metrics"]["dvclive/train/metrics.json"]["data"]["train"]["epoch_loss"]
            for name in rates}
    assert loss["lr-high"] < loss["lr-low"], loss
    # the workspace keeps its own params: queued runs happen in temp copies
    assert f"lr_encoder: {pipeline_run.params['train']['lr_encoder']}" in (root / "params.yaml").read_text()
