"""The lr-find command (not a DVC stage): an LR range test, its plot and a suggested rate.

``main()`` reads its params once and calls the layers with plain values.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.modeling.lr_find import plot, range_test
from pipeline.modeling.train import TrainConfig

log = logging.getLogger(__name__)


def main(params: dict[str, Any], start: float, end: float, steps: int) -> None:
    paths = params["paths"]
    result = range_test(paths["conll_dir"], paths["encoder"], TrainConfig.from_params(params["train"]),
                        params["seed"], start=start, end=end, steps=steps)
    write_json(paths["lr_find_report"], result)
    plot(result, paths["lr_find_plot"])
    log.info("wrote %s and %s", paths["lr_find_report"], paths["lr_find_plot"])
