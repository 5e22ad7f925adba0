"""The export stage: models/best into models/onnx (fp32 and int8) and metrics/export.json.

``main()`` reads its params once and calls the layers with plain values.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config import ExportConfig
from pipeline.modeling.export import export


def main(params: dict[str, Any]) -> None:
    paths = params["paths"]
    export(paths["model_dir"], paths["onnx_dir"], paths["conll_dir"], paths["export_metrics"],
           ExportConfig.from_params(params))
