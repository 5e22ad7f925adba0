"""The Ray engine of predict (issue 20): a real local Ray, the same shards as the local engine, byte for byte.

One local Ray of 2 CPUs serves the whole module (starting one costs seconds): ``address="local"`` so that a Ray
someone else started on this machine (``ray start``) is never joined. The model is the tiny random tagger of
tests/test_predict_stream.py; the export is the sample's texts cycled with new ids.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import PredictConfig, PredictRayConfig
from pipeline.core.errors import PipelineError
from pipeline.labelstudio.preannotate import predict_export
from pipeline.labelstudio.preannotate_ray import ray_engine
from pipeline.labelstudio.shards import MANIFEST, file_sha256, work_dir
from pipeline.runtime.inference import ModelCard, NerRuntime
from tests.conftest import ROOT
from tests.test_predict_stream import SAMPLE_CONFIG, config, cycled_export, folder_bytes, tiny_onnx  # noqa: F401

pytestmark = pytest.mark.slow

RAY_TASKS = 3000  # a sixth labeled: 2,571 to predict, 11 chunks of 256, shards of 1,000 (the last one partial)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return cycled_export(tmp_path_factory.mktemp("ray-export") / "tasks.json", RAY_TASKS, labeled_every=7)


@pytest.fixture(scope="module")
def local_result(tiny_onnx, config, export, tmp_path_factory) -> Path:  # noqa: F811
    """The local engine's output, as the predict command writes it (model hash in the manifest)."""
    out = tmp_path_factory.mktemp("local") / "pred"
    runtime = NerRuntime(tiny_onnx, threads=1)
    predict_export(runtime, export, out, config, shard_size=1000, progress=False,
                   model_sha256=file_sha256(runtime.onnx_path))
    return out


def bounded_runtime(model_dir: Path, threads: int) -> NerRuntime:
    """The runtime, made only where the tokenizer's thread pool is bounded like ONNX Runtime's (an actor's CPUs)."""
    rayon = os.environ.get("RAYON_NUM_THREADS")
    if rayon != str(threads):
        raise PipelineError(f"RAYON_NUM_THREADS is {rayon!r} in an actor of {threads} CPUs")
    return NerRuntime(model_dir, threads=threads)


def engine(model_dir: Path, actors: int = 2, cpus: int = 1):
    card = ModelCard.read(model_dir)
    make = partial(bounded_runtime, model_dir.resolve())
    return card, ray_engine(make, PredictRayConfig(actors=actors, cpus_per_actor=cpus))


def ray_predict(model_dir: Path, export: Path, out: Path, config, actors: int = 2, cpus: int = 1, **kw):
    card, rows = engine(model_dir, actors, cpus)
    return predict_export(card, export, out, config, progress=False, engine=rows,
                          model_sha256=file_sha256(card.onnx_path), **kw)


@pytest.mark.parametrize("actors,cpus", [(2, 1), (1, 2)])
def test_ray_shards_are_the_local_shards_byte_for_byte(ray_local, tiny_onnx, config, export, local_result,  # noqa: F811
                                                       tmp_path, actors, cpus):
    manifest = ray_predict(tiny_onnx, export, tmp_path / "pred", config, actors, cpus, shard_size=1000)
    want, got = folder_bytes(local_result), folder_bytes(tmp_path / "pred")
    assert [s["tasks"] for s in manifest["shards"]] == [1000, 1000, 571]
    assert manifest["tasks"] == RAY_TASKS - len(range(0, RAY_TASKS, 7)) and manifest["entities"] > 0
    assert sorted(got) == sorted(want) == [MANIFEST, "part-00000.json", "part-00001.json", "part-00002.json"]
    for name in want:  # the manifest too: nothing in it says which engine wrote the shards
        assert got[name] == want[name], name
    assert not work_dir(tmp_path / "pred").exists()


def test_ray_finishes_a_run_the_local_engine_began(ray_local, tiny_onnx, config, export, local_result,  # noqa: F811
                                                   tmp_path, monkeypatch, caplog):
    runtime = NerRuntime(tiny_onnx, threads=1)
    real, seen = runtime.predict, []

    def dies_in_the_third_shard(texts):  # as Ctrl-C would
        seen.append(len(texts))
        if sum(seen) > 2300:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(runtime, "predict", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        predict_export(runtime, export, tmp_path / "pred", config, shard_size=1000, progress=False,
                       model_sha256=file_sha256(runtime.onnx_path))
    assert sorted(p.name for p in work_dir(tmp_path / "pred").glob("part-*")) == ["part-00000.json",
                                                                                 "part-00001.json"]
    caplog.set_level("INFO")
    ray_predict(tiny_onnx, export, tmp_path / "pred", config, shard_size=1000)
    assert "resuming after 2 finished shards (2000 tasks)" in caplog.text
    assert "predict 4 chunks of 256 tasks" in caplog.text  # chunks 7-10 of 0-10: from task 1792 = 7 x 256
    assert folder_bytes(tmp_path / "pred") == folder_bytes(local_result)


def test_json_lines_input(ray_local, tiny_onnx, config, tmp_path):  # noqa: F811
    jsonl = cycled_export(tmp_path / "tasks.jsonl", 700, labeled_every=3, jsonl=True)
    runtime = NerRuntime(tiny_onnx, threads=1)
    want = predict_export(runtime, jsonl, tmp_path / "a", config, shard_size=300, progress=False,
                          model_sha256=file_sha256(runtime.onnx_path))
    got = ray_predict(tiny_onnx, jsonl, tmp_path / "b", config, shard_size=300)
    assert got == want and folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


def test_settings_the_cluster_cannot_place_are_refused_before_any_prediction(ray_local, tiny_onnx,  # noqa: F811
                                                                            config, export, tmp_path):
    for actors, cpus, message in [(3, 1, "predict.ray.actors: 3 actors x 1 CPU need 3 CPUs, the Ray cluster has 2"),
                                  (0, 3, "predict.ray.cpus_per_actor: 3 CPUs per actor, but the biggest Ray node "
                                         "has 2")]:
        with pytest.raises(PipelineError) as caught:
            ray_predict(tiny_onnx, export, tmp_path / "pred", config, actors, cpus, shard_size=1000)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
        assert not list(work_dir(tmp_path / "pred").glob("part-*"))
    with pytest.raises(PipelineError, match="predict.ray.actors: Input should be greater than or equal to 0"):
        PredictConfig.from_params({"predict": {"engine": "ray", "ray": {"actors": -1}}})
    with pytest.raises(PipelineError, match="predict.ray.workers: Extra inputs are not permitted"):
        PredictConfig.from_params({"predict": {"ray": {"workers": 2}}})


def test_a_gzip_export_is_refused_in_one_line(ray_local, tiny_onnx, config, export, tmp_path):  # noqa: F811
    packed = tmp_path / "tasks.json.gz"
    packed.write_bytes(gzip.compress(export.read_bytes()))
    with pytest.raises(PipelineError, match=r"tasks.json.gz: predict.engine ray reads the export by byte ranges "
                                            r".*decompress it \(gunzip\)"):
        ray_predict(tiny_onnx, packed, tmp_path / "pred", config)


def cli(tmp_path: Path, model: Path, export: Path, out: str, address: str | None = None,
        **env: str) -> subprocess.CompletedProcess:
    """``python -m pipeline predict`` with ``predict.engine: ray``; ``address``: RAY_ADDRESS (None: unset)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["predict"].update(shard_size=1000, engine="ray")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address is not None:
        environ["RAY_ADDRESS"] = address
    return subprocess.run([sys.executable, "-m", "pipeline", "--params", str(tmp_path / "params.yaml"), "predict",
                           "--model", str(model), "--tasks", str(export), "--label-config", str(SAMPLE_CONFIG),
                           "--out", str(tmp_path / out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**environ, **env})


def test_the_predict_command_starts_a_local_ray_when_no_address_is_given(tiny_onnx, export, local_result,  # noqa: F811
                                                                         tmp_path):
    done = cli(tmp_path, tiny_onnx, export, "pred")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ray: no RAY_ADDRESS, started a local Ray on this machine" in done.stderr
    assert re.search(r"Ray: \d+ actors of 1 CPU each predict 11 chunks of 256 tasks", done.stderr)
    assert folder_bytes(tmp_path / "pred") == folder_bytes(local_result)


def test_a_cluster_that_is_not_there_is_one_line(tiny_onnx, export, tmp_path):  # noqa: F811
    done = cli(tmp_path, tiny_onnx, export, "pred", address="127.0.0.1:9")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "Ray: cannot connect to the cluster at RAY_ADDRESS=127.0.0.1:9: " in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_without_ray_installed_the_error_names_the_extra(tiny_onnx, export, tmp_path):  # noqa: F811
    blocker = tmp_path / "sitecustomize.py"  # Ray absent: every `import ray` fails, as in an install without it
    blocker.write_text("import sys\nsys.modules['ray'] = None\n")
    done = cli(tmp_path, tiny_onnx, export, "pred", PYTHONPATH=str(tmp_path))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert 'predict.engine: ray needs Ray Data' in last and 'pip install ".[scale]"' in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
