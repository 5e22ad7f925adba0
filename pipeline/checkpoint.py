"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds model, optimizer, scheduler, every RNG, the position in
the epoch's batch order and the early-stopping state. It is written to a temp
file and renamed, so a run killed mid-write leaves the previous checkpoint
intact. A fingerprint of the settings and data ties it to one run: a
checkpoint from other params is ignored, never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
PROGRESS = "last.json"  # small sidecar: where the checkpoint stands, readable without torch.load


def fingerprint(settings: dict[str, Any], files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def rng_state(rng: random.Random) -> dict[str, Any]:
    return {"python": rng.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: random.Random, state: dict[str, Any]) -> None:
    rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, state: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    progress = {k: state[k] for k in ("fingerprint", "epoch", "batch", "step", "completed")}
    fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".json", dir=directory)
    with os.fdopen(fd, "w") as fh:
        json.dump(progress, fh)
    os.replace(tmp, directory / PROGRESS)


def load_resumable(directory: str | Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The last checkpoint of this very run, if it stopped before finishing."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    if state.get("fingerprint") != expected_fingerprint:
        log.info("checkpoint in %s is from other settings or data; starting afresh", directory)
        return None
    if state.get("completed"):
        return None
    log.info("resuming from epoch %d, batch %d (optimizer step %d)", state["epoch"] + 1, state["batch"],
             state["step"])
    return state
