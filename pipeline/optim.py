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

from pipeline.errors import ParamsError
from pipeline.model import BertBiLstmCrf

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "constant_with_warmup", "constant")


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
    return torch.optim.AdamW(parameter_groups(model, **rates), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                    warmup: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup given as a share of optimizer steps (< 1) or a step count (>= 1)."""
    if schedule not in SCHEDULES:
        raise ParamsError(f"train.schedule: {schedule!r} is not one of {SCHEDULES}")
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
