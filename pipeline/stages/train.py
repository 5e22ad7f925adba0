"""The train stage: data/conll and the pretrained encoder into models/best, with DVCLive metrics.

``main()`` reads its params once and calls the layers with plain values.
"""

from __future__ import annotations

from typing import Any

from pipeline.modeling.train import TrainConfig, train


def main(params: dict[str, Any]) -> None:
    paths = params["paths"]
    train(paths["conll_dir"], paths["encoder"], paths["model_dir"], paths["train_live"],
          TrainConfig.from_params(params["train"]), params["seed"], paths.get("checkpoint_dir"))
