"""Pre-annotate tasks: the ONNX runtime's entities wrapped as Label Studio predictions, streamed into shards.

Output is a folder (``paths.predictions``) of Label Studio import files ``part-00000.json`` … of at most
``predict.shard_size`` tasks, and ``manifest.json``: each task keeps its ``id`` and ``data`` and gains
``predictions: [{model_version, score, result}]``, where each region carries its own score and
``from_name``/``to_name`` come from the label config. An interrupted run continues after its last finished
shard (``pipeline.labelstudio.preannotate``, ``pipeline.labelstudio.shards``). ``predict.engine: ray`` predicts
on Ray actors instead of this process and writes the same files (``pipeline.labelstudio.preannotate_ray``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from pipeline.core.config import PredictConfig
from pipeline.labelstudio.labelconfig import read_label_config
from pipeline.labelstudio.preannotate import predict_export
from pipeline.labelstudio.preannotate_ray import ray_engine
from pipeline.labelstudio.shards import file_sha256
from pipeline.runtime.inference import ModelCard, NerRuntime


def main(params: dict[str, Any]) -> None:
    paths, conf = params["paths"], PredictConfig.from_params(params)
    model_dir = Path(paths["onnx_dir"])
    make_runtime = partial(NerRuntime, model_dir.resolve(), quantized=conf.quantized, max_tokens=conf.max_tokens,
                           batch_size=conf.batch_size)
    if conf.engine == "ray":  # the actors load the model; here only what it says about itself
        model: Any = ModelCard.read(model_dir, conf.quantized)
        model_sha = file_sha256(model.onnx_path)
        # every actor loads the graph hashed here (the int8 one picked by this CPU), whatever its own CPU: one run,
        # one graph, and the resume key names what produced every shard
        make_runtime = partial(make_runtime, onnx_file=model.onnx_path.name)
        engine = ray_engine(make_runtime, conf.ray, {str(model.onnx_path.resolve()): model_sha})
    else:
        model = make_runtime(threads=conf.threads)
        model_sha, engine = file_sha256(model.onnx_path), None
    predict_export(model, paths["export"], paths["predictions"], read_label_config(paths["label_config"]),
                   which=conf.tasks, shard_size=conf.shard_size, uncertainty=conf.uncertainty,
                   model_version=conf.model_version or None, model_sha256=model_sha,
                   settings=conf.output_settings(), engine=engine)
