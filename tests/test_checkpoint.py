"""Checkpoints: an exact resume from our own files, and nothing executed from a planted one."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from pipeline.modeling import checkpoint


class _Payload:
    """What an attacker plants as ``last.pt``: unpickling it would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state(rng: random.Random, fingerprint: str) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return {"fingerprint": fingerprint, "epoch": 1, "batch": 3, "step": 7, "completed": False,
            "batches": [[0, 2], [1, 3]], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
            "rng": checkpoint.rng_state(rng), "best_f1": 0.5, "best_epoch": 0, "stale": 0,
            "history": [{"epoch": 1, "dev_f1": 0.5}], "total_loss": 1.25, "seen": 8}


def test_a_checkpoint_resumes_every_rng_exactly(tmp_path):
    rng = random.Random(3)
    np.random.seed(5)
    torch.manual_seed(7)
    checkpoint.save(tmp_path, _state(rng, "run-1"))
    expected = (rng.random(), np.random.rand(), torch.rand(1).item())
    rng.random(), np.random.rand(), torch.rand(1)  # move every generator on

    state = checkpoint.load_resumable(tmp_path, "run-1")
    assert state is not None and state["step"] == 7 and state["batches"] == [[0, 2], [1, 3]]
    checkpoint.restore_rng(rng, state["rng"])
    assert (rng.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_other_settings_or_a_finished_run_start_afresh(tmp_path):
    checkpoint.save(tmp_path, _state(random.Random(0), "run-1"))
    assert checkpoint.load_resumable(tmp_path, "run-2") is None
    state = _state(random.Random(0), "run-1")
    state["completed"] = True
    checkpoint.save(tmp_path, state)
    assert checkpoint.load_resumable(tmp_path, "run-1") is None


def test_a_planted_checkpoint_runs_no_code_and_is_ignored(tmp_path, caplog):
    marker = tmp_path / "pwned"
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    # the sidecar says "this very run", so the loader gets as far as reading last.pt
    (directory / checkpoint.PROGRESS).write_text(json.dumps(
        {"fingerprint": "run-1", "epoch": 0, "batch": 1, "step": 1, "completed": False}))
    torch.save({"fingerprint": "run-1", "completed": False, "model": _Payload(str(marker))}, directory / checkpoint.CHECKPOINT)

    assert checkpoint.load_resumable(directory, "run-1") is None
    assert not marker.exists()
    assert "ignoring" in caplog.text and "last.pt" in caplog.text
