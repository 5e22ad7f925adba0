"""A training run killed with SIGKILL mid-epoch and resumed ends bitwise equal to an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.conftest import make_train_project

pytestmark = pytest.mark.slow


def make_project(path, tiny_encoder):
    make_train_project(path, tiny_encoder, 300, epochs=2, batch_size=4, lstm_hidden=16, lr_encoder=1e-3,
                       checkpoint_every=5, patience=5, threads=1)


def final_state(path):
    return torch.load(path / "models" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path, tiny_encoder):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for project in (whole, killed):
        make_project(project, tiny_encoder)
    train = [sys.executable, "-m", "pipeline", "train"]
    subprocess.run(train, cwd=whole, check=True, capture_output=True, timeout=900)

    proc = subprocess.Popen(train, cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed / "models" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, "training finished before it could be interrupted"
        assert time.monotonic() < deadline
        if progress.exists():
            state = json.loads(progress.read_text())
            if state["batch"] > 0 and state["step"] >= 10:  # mid-epoch, after a few checkpoints
                break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = json.loads(progress.read_text())
    assert not interrupted_at["completed"]

    shutil.rmtree(killed / "dvclive")  # as `dvc repro` does: it removes a stage's outputs before running it
    resumed = subprocess.run(train, cwd=killed, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch" in resumed.stderr

    a, b = final_state(whole), final_state(killed)
    assert a["completed"] and b["completed"] and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["history"] == b["history"]
    assert (whole / "models" / "best" / "model.safetensors").read_bytes() == \
        (killed / "models" / "best" / "model.safetensors").read_bytes()

    # the plots of the resumed run continue at the checkpoint's step: its last rows are the whole run's
    for series, tail in (("dev/f1.tsv", 1), ("train/loss.tsv", 3)):
        rows = [(run / "dvclive" / "train" / "plots" / "metrics" / series).read_text().splitlines()
                for run in (whole, killed)]
        assert rows[1][0] == rows[0][0] and rows[1][-tail:] == rows[0][-tail:], series


def test_diverging_training_stops_with_a_clear_error(tmp_path, tiny_encoder):
    make_project(tmp_path, tiny_encoder)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"].update(lr_encoder=1e30, lr_head=1e30, lr_crf=1e30, warmup=0, max_bad_steps=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not finite for 3 optimizer steps in a row" in proc.stderr
    assert "skipped an optimizer step" in proc.stderr
    assert "origin: " in proc.stderr and "last one: " in proc.stderr  # which module, weight or gradient went first
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "best").exists()  # nothing trained is passed off as a model
