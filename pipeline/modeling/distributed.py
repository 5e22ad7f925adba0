"""Data-parallel training under ``torchrun``: who this process is and what it trains on.

``torchrun --nproc_per_node N -m pipeline train`` sets ``WORLD_SIZE``/``RANK``;
one plain ``python -m pipeline train`` is a world of one and never touches
``torch.distributed``. Every rank builds the same length-bucketed batch order
(same seed) and trains on its slice of each batch. That is what a
``DistributedSampler`` does for plain datasets, done per batch so that
bucketing survives; a run on N processes makes the same optimizer steps as a
run on one, with the same global batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.core.errors import ParamsError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: list[int]) -> tuple[list[int], float]:
        """This rank's part of a global batch, and its weight in the batch's mean loss.

        A rank whose slice is empty (a batch smaller than the world) still runs
        one example, weighted 0, so that every rank joins the gradient all-reduce.
        """
        mine = batch[self.rank::self.size]
        if not mine:
            return batch[:1], 0.0
        return mine, float(self.size) / len(batch)

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # nccl reduces GPU tensors only
        dist.all_reduce(tensor)
        return float(tensor.item())

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (dev scores decide early stopping for all)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParamsError(f"train.device: {name!r} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def start(device_name: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, pick_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
