"""``python -m pipeline lr-find``: the learning-rate range test (Smith, 2017).

The rates rise exponentially over a few hundred steps while the loss is
watched; the suggestion is where the smoothed loss falls fastest, before it
blows up. The encoder, head and CRF rates rise together and keep the ratios
set in ``params.yaml``, so the suggested encoder rate comes with its head and
CRF rates. (torch-lr-finder does the same for ``criterion(model(x), y)``
models; a CRF loss over several inputs and three rate groups does not fit it.)
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.atomic import atomic_open
from pipeline.core.errors import ParamsError
from pipeline.modeling import distributed
from pipeline.modeling.data import bucket_batches, collate
from pipeline.modeling.optim import build_optimizer
from pipeline.modeling.train import Objective, TrainConfig, prepare, seed_everything

log = logging.getLogger(__name__)


def suggest(lrs: list[float], smoothed: list[float]) -> int:
    """Index of the steepest fall of the smoothed loss against log LR, up to its minimum."""
    low = int(np.argmin(smoothed))
    if low < 2:
        return low
    slope = np.gradient(np.asarray(smoothed[:low + 1]), np.log(np.asarray(lrs[:low + 1])))
    return int(np.argmin(slope))


def range_test(conll_dir: str | Path, encoder_dir: str | Path, config: TrainConfig, seed: int, *,
               start: float = 1e-7, end: float = 1.0, steps: int = 100, smoothing: float = 0.9,
               diverge: float = 4.0) -> dict[str, Any]:
    if not 0 < start < end or steps < 5:
        raise ParamsError(f"lr-find: need 0 < start < end and at least 5 steps (got {start}, {end}, {steps})")
    seed_everything(seed)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)
    device = distributed.pick_device(config.device)
    model, data = prepare(conll_dir, encoder_dir, config, device)
    ratios = {"encoder": 1.0, "head": config.lr_head / config.lr_encoder, "crf": config.lr_crf / config.lr_encoder}
    optimizer = build_optimizer(model, lr_encoder=config.lr_encoder, lr_head=config.lr_head, lr_crf=config.lr_crf,
                                weight_decay=config.weight_decay, layer_decay=config.layer_decay)
    scale = [g["lr"] / config.lr_encoder for g in optimizer.param_groups]  # each group's ratio to the encoder
    objective = Objective(model).train()
    rng = random.Random(seed)
    batches: list[list[int]] = []
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    stopped_early = False
    for k in tqdm(range(steps), desc="lr-find", mininterval=2.0, leave=False):
        lr = start * (end / start) ** (k / (steps - 1))
        for group, s in zip(optimizer.param_groups, scale):
            group["lr"] = lr * s
        if not batches:
            batches = bucket_batches(data.train_ex, config.batch_size, rng)
        idx = batches.pop()
        batch = {k: v.to(device) for k, v in collate([data.train_ex[j] for j in idx], data.specials.pad).items()}
        loss = objective(**batch) / len(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            stopped_early = True
            break
        average = smoothing * average + (1 - smoothing) * value
        debiased = average / (1 - smoothing ** (k + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(debiased)
        best = min(best, debiased)
        if k > steps // 10 and debiased > diverge * best:
            stopped_early = True
            break
    if len(lrs) < 3:
        raise ParamsError(f"lr-find: the loss diverged within {len(lrs)} steps; lower lr-find --start")
    pick = suggest(lrs, smoothed)
    suggestion = {f"lr_{name}": lrs[pick] * r for name, r in ratios.items()}
    log.info("suggested rates: %s (loss fell fastest there; %d steps%s)",
             ", ".join(f"{k} {v:.2e}" for k, v in suggestion.items()), len(lrs),
             ", stopped when the loss diverged" if stopped_early else "")
    return {"suggested": suggestion, "stopped_early": stopped_early, "steps": len(lrs),
            "points": [{"lr_encoder": a, "loss": b, "smoothed": c} for a, b, c in zip(lrs, losses, smoothed)]}


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["lr_encoder"] for p in points], [p["loss"] for p in points], alpha=0.3, label="loss")
    ax.plot([p["lr_encoder"] for p in points], [p["smoothed"] for p in points], label="smoothed")
    pick = result["suggested"]["lr_encoder"]
    ax.axvline(pick, color="red", linestyle="--", label=f"suggested lr_encoder {pick:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("encoder learning rate (head and CRF keep their ratios)")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
