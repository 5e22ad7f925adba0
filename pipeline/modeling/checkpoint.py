"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds model, optimizer, scheduler, every RNG, the position in
the epoch's batch order and the early-stopping state. It is written to a temp
file and renamed, so a run killed mid-write leaves the previous checkpoint
intact. A fingerprint of the settings and data ties it to one run: a
checkpoint from other params is ignored, never resumed. It holds tensors and
plain containers only and is read with ``weights_only=True``: a planted
``last.pt`` cannot run code when training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import atomic_open, write_json

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
PROGRESS = "last.json"  # small sidecar: where the checkpoint stands, readable without torch.load


def fingerprint(settings: dict[str, Any], files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def rng_state(rng: random.Random) -> dict[str, Any]:
    """Every RNG's state as tensors, ints and tuples only, so that ``torch.load(weights_only=True)`` reads it."""
    numpy_state = np.random.get_state(legacy=False)
    return {"python": rng.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"bit_generator": numpy_state["bit_generator"],
                      "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                      "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                      "gauss": float(numpy_state["gauss"])},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: random.Random, state: dict[str, Any]) -> None:
    rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, state: dict[str, Any]) -> None:
    directory = Path(directory)
    with atomic_open(directory / CHECKPOINT, "wb") as fh:
        torch.save(_plain(state), fh)
    write_json(directory / PROGRESS, {k: state[k] for k in ("fingerprint", "epoch", "batch", "step", "completed")},
               indent=None)


def load_resumable(directory: str | Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The last checkpoint of this very run, if it stopped before finishing."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        return None
    progress = _read_progress(Path(directory) / PROGRESS)
    if progress is None or progress.get("fingerprint") != expected_fingerprint or progress.get("completed"):
        log.info("checkpoint in %s is from other settings or data, or finished; starting afresh", directory)
        return None
    try:  # tensors and plain containers only: a planted pickle cannot run code here
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        log.warning("ignoring %s (not a checkpoint this version can read safely: %s); starting afresh",
                    path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint or state.get("completed"):
        log.info("checkpoint in %s is from other settings or data; starting afresh", directory)
        return None
    log.info("resuming from epoch %d, batch %d (optimizer step %d)", state["epoch"] + 1, state["batch"],
             state["step"])
    return state


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays (seqeval's F1s, for one) as Python numbers and tensors."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def _read_progress(path: Path) -> dict[str, Any] | None:
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None
