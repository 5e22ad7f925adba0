"""Pre-annotate tasks: the ONNX runtime's entities wrapped as Label Studio predictions, streamed into shards.

Output is a folder (``paths.predictions``) of Label Studio import files ``part-00000.json`` … of at most
``predict.shard_size`` tasks, and ``manifest.json``: each task keeps its ``id`` and ``data`` and gains
``predictions: [{model_version, score, result}]``, where each region carries its own score and
``from_name``/``to_name`` come from the label config. An interrupted run continues after its last finished
shard (``pipeline.labelstudio.preannotate``, ``pipeline.labelstudio.shards``).
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config import PredictConfig
from pipeline.labelstudio.labelconfig import read_label_config
from pipeline.labelstudio.preannotate import predict_export
from pipeline.labelstudio.shards import file_sha256
from pipeline.runtime.inference import NerRuntime


def main(params: dict[str, Any]) -> None:
    paths, conf = params["paths"], PredictConfig.from_params(params)
    runtime = NerRuntime(paths["onnx_dir"], quantized=conf.quantized, threads=conf.threads,
                         max_tokens=conf.max_tokens, batch_size=conf.batch_size)
    predict_export(runtime, paths["export"], paths["predictions"], read_label_config(paths["label_config"]),
                   which=conf.tasks, shard_size=conf.shard_size, uncertainty=conf.uncertainty,
                   model_version=conf.model_version or None, model_sha256=file_sha256(runtime.onnx_path),
                   settings=conf.model_dump())
