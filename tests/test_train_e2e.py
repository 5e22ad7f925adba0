"""A short real training run on the sample tweets with the real MiniLM encoder learns entities."""

import json
import subprocess
import sys

import pytest

from tests.conftest import make_train_project

pytestmark = pytest.mark.slow

F1_FLOOR = 0.10  # a model that learns nothing tags everything O and scores 0; this run scores ~0.26


def test_short_training_on_the_sample_beats_a_low_f1_floor(tmp_path, minilm_dir):
    make_train_project(tmp_path, minilm_dir, 600, epochs=2, batch_size=8, max_length=64, lstm_hidden=64,
                       lr_encoder=1e-4, lr_head=3e-3, lr_crf=3e-2)
    for stage in ("train", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", "pipeline", stage], cwd=tmp_path, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    test = json.loads((tmp_path / "metrics" / "eval.json").read_text())["test"]
    assert test["f1"] > F1_FLOOR, test
    assert test["sentences"] > 40
