"""Optimizer parameter groups and warmup schedules.

BERT needs a small rate, the freshly initialised BiLSTM/linear head a larger
one, and the CRF transitions larger still: with one BERT-sized rate for all,
the CRF barely moves and the tagger learns almost nothing (DESIGN.md: F1
0.008 vs 0.548 on the sample).
"""

from __future__ import annotations

import logging

import torch
from transformers import get_scheduler

from pipeline.core.errors import ParamsError
from pipeline.modeling.model import BertBiLstmCrf

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "constant_with_warmup", "constant", "plateau", "none")


def _no_decay(name: str) -> bool:
    return name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name


def parameter_groups(model: BertBiLstmCrf, *, lr_encoder: float, lr_head: float, lr_crf: float,
                     weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Groups: encoder (optionally decayed per layer, embeddings lowest), head, CRF."""
    n_layers = model.bert.config.num_hidden_layers
    groups: dict[tuple[str, float, float], list] = {}

    def add(group: str, lr: float, wd: float, param: torch.nn.Parameter) -> None:
        groups.setdefault((group, lr, wd), []).append(param)

    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("bert."):
            if ".encoder.layer." in name:
                depth = int(name.split(".encoder.layer.")[1].split(".")[0]) + 1
                label = f"encoder.layer{depth - 1}"
            elif ".embeddings." in name:
                depth, label = 0, "encoder.embeddings"
            else:
                depth, label = n_layers, "encoder.other"
            lr = lr_encoder * layer_decay ** (n_layers - depth)
            if layer_decay == 1.0:
                label = "encoder"
            add(label, lr, 0.0 if _no_decay(name) else weight_decay, param)
        elif name.startswith("crf."):
            add("crf", lr_crf, 0.0, param)
        else:
            add("head", lr_head, 0.0 if _no_decay(name) else weight_decay, param)
    result = []
    for (label, lr, wd), params in groups.items():
        name = label if wd else f"{label} (no decay)"
        result.append({"name": name, "params": params, "lr": lr, "weight_decay": wd})
        log.info("param group %-30s %9d params  lr %.2e  wd %.3g", name, sum(p.numel() for p in params), lr, wd)
    return result


def build_optimizer(model: BertBiLstmCrf, **rates: float) -> torch.optim.AdamW:
    # fused: one kernel over all parameters; the default per-tensor loop took 16% of a CPU epoch
    # (benchmarks/train.py: 864 -> 1,109 tokens/s on a 2-core Xeon), and it is what Trainer uses
    return torch.optim.AdamW(parameter_groups(model, **rates), eps=1e-8, fused=True)


class LrSchedule:
    """The learning-rate policy of a run, stepped once per optimizer step.

    Per-step schedules come from transformers' ``get_scheduler``. ``plateau``
    warms up like ``constant_with_warmup`` and then hands over to torch's
    ``ReduceLROnPlateau`` on dev F1 at each epoch end; the two never step
    together, so neither overwrites the other's rates.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup: float,
                 plateau_factor: float = 0.5, plateau_patience: int = 1) -> None:
        if schedule not in SCHEDULES:
            raise ParamsError(f"train.schedule: {schedule!r} is not one of {SCHEDULES}")
        if warmup < 0:
            raise ParamsError(f"train.warmup: {warmup} must be >= 0 (a share below 1, or a step count)")
        self.warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
        per_step = {"plateau": "constant_with_warmup", "none": "constant"}.get(schedule, schedule)
        warmup_steps = 0 if schedule == "none" else self.warmup_steps
        self.per_step = get_scheduler(per_step, optimizer, num_warmup_steps=warmup_steps,
                                      num_training_steps=total_steps)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=plateau_factor, patience=plateau_patience) if schedule == "plateau" else None
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.plateau is None or self.steps <= self.warmup_steps:
            self.per_step.step()

    def epoch_end(self, dev_f1: float) -> None:
        if self.plateau is not None and self.steps >= self.warmup_steps:
            self.plateau.step(dev_f1)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "per_step": self.per_step.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup: float,
                    plateau_factor: float = 0.5, plateau_patience: int = 1) -> LrSchedule:
    """Warmup given as a share of optimizer steps (< 1) or a step count (>= 1)."""
    return LrSchedule(optimizer, schedule, total_steps, warmup, plateau_factor, plateau_patience)
