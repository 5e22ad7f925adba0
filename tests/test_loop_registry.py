"""The loop's decisions: the gate, scoring both models alike, and the registry's atomic promotion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from pipeline.core.conll import read_conll
from pipeline.core.metrics import score
from pipeline.loop.gate import decide
from pipeline.loop.registry import Registry, RegistryError
from pipeline.loop.scoring import score_model
from tests.conftest import FORCED_CYCLE


@pytest.mark.parametrize("candidate,served,promote,why", [
    ({"dev_f1": 0.60, "test_f1": 0.58}, None, True, "first model"),
    ({"dev_f1": 0.61, "test_f1": 0.58}, {"dev_f1": 0.60, "test_f1": 0.58}, True, "+1.00 points"),
    ({"dev_f1": 0.60, "test_f1": 0.70}, {"dev_f1": 0.60, "test_f1": 0.58}, False, "not above loop.min_gain 0"),
    ({"dev_f1": 0.59, "test_f1": 0.70}, {"dev_f1": 0.60, "test_f1": 0.58}, False, "-1.00 points"),
    ({"dev_f1": 0.65, "test_f1": 0.56}, {"dev_f1": 0.60, "test_f1": 0.58}, False, "test drop above"),
    ({"dev_f1": 0.65, "test_f1": 0.575}, {"dev_f1": 0.60, "test_f1": 0.58}, True, "-0.50 points"),
])
def test_the_gate_promotes_only_a_dev_gain_without_a_large_test_drop(candidate, served, promote, why):
    decision = decide(candidate, served, min_gain=0.0, max_test_drop=1.0)
    assert decision.promote is promote and why in decision.reason
    assert decision.to_dict()["decision"] == ("promoted" if promote else "rejected")


def test_min_gain_is_in_points():
    served = {"dev_f1": 0.600, "test_f1": 0.58}
    assert not decide({"dev_f1": 0.604, "test_f1": 0.58}, served, min_gain=0.5, max_test_drop=1.0).promote
    assert decide({"dev_f1": 0.606, "test_f1": 0.58}, served, min_gain=0.5, max_test_drop=1.0).promote


def test_both_models_are_scored_by_the_serving_runtime_on_the_same_files(pipeline_run, forced_onnx):
    conll = pipeline_run.path("conll_dir")
    exported = json.loads(pipeline_run.path("export_metrics").read_text())
    assert score_model(pipeline_run.path("onnx_dir"), conll)["test_f1"] == exported["test_f1_fp32"]

    forced = score_model(forced_onnx, conll)  # its tags are known without running it: the forced cycle
    for split in ("dev", "test"):
        sentences = list(read_conll(conll / f"{split}.conll"))
        expected = [[FORCED_CYCLE[i % len(FORCED_CYCLE)] for i in range(len(s.tags))] for s in sentences]
        assert forced[f"{split}_f1"] == score([s.tags for s in sentences], expected, "BIO")["f1"]
        assert forced[f"{split}_sentences"] == len(sentences)


def fake_model(path, version: str):
    path.mkdir(parents=True)
    (path / "model_info.json").write_text(json.dumps({"model_version": version}))
    (path / "model.onnx").write_bytes(version.encode() * 100)
    return path


def test_versions_are_written_beside_each_other_never_over_and_the_served_link_swaps(tmp_path):
    registry = Registry(tmp_path / "models")
    assert registry.served() is None
    registry.add(fake_model(tmp_path / "a", "v1"), {"version": "v1", "dev_f1": 0.5, "source": "loop"})
    registry.add(fake_model(tmp_path / "b", "v2"), {"version": "v2", "dev_f1": 0.6, "source": "loop"})
    with pytest.raises(RegistryError, match="already registered"):
        registry.add(tmp_path / "b", {"version": "v2"})

    registry.promote("v1")
    assert registry.served()["version"] == "v1"
    assert (registry.served_link / "model.onnx").read_bytes() == b"v1" * 100
    registry.promote("v2", reason="better")
    assert json.loads((registry.served_link / "model_info.json").read_text())["model_version"] == "v2"
    assert os.readlink(registry.served_link) == "versions/v2"  # relative: the project folder can move
    assert (tmp_path / "models" / "versions" / "v1" / "model.onnx").read_bytes() == b"v1" * 100  # kept
    data = registry.read()
    assert [p["version"] for p in data["promotions"]] == ["v1", "v2"] and data["promotions"][1]["previous"] == "v1"
    with pytest.raises(RegistryError, match=r"no model version 'v9'.*known: v1, v2"):
        registry.promote("v9")


def test_a_reader_never_sees_the_served_model_missing_while_versions_swap(tmp_path):
    registry = Registry(tmp_path / "models")
    for v in ("v1", "v2"):
        registry.add(fake_model(tmp_path / v, v), {"version": v})
    registry.promote("v1")
    misses, done = [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                (registry.served_link / "model_info.json").read_bytes()
            except OSError as exc:
                misses.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(300):
        registry.promote("v2" if i % 2 == 0 else "v1")
    done.set()
    reader.join()
    assert misses == []


def test_promote_command_registers_lists_and_rolls_back(pipeline_run, tmp_path):
    info = json.loads((pipeline_run.path("onnx_dir") / "model_info.json").read_text())
    params = dict(pipeline_run.params)  # the registry in tmp_path: the shared project stays as it was
    params["paths"] = {**params["paths"], "onnx_dir": str(pipeline_run.path("onnx_dir")),
                       "registry_dir": str(tmp_path / "models")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def promote(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "--params", str(tmp_path / "params.yaml"),
                               "promote", *args], cwd=pipeline_run.root, env=pipeline_run.env,
                              capture_output=True, text=True, timeout=120, check=False)

    first = promote("--register")
    assert first.returncode == 0, first.stderr
    registry = Registry(tmp_path / "models")
    assert registry.served()["version"] == info["model_version"]
    assert (registry.served_link / "model.onnx").is_file()
    listed = promote("--list")
    assert f"* {info['model_version']}" in listed.stderr
    wrong = promote("no-such-version")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "no model version 'no-such-version'" in wrong.stderr
    assert registry.served()["version"] == info["model_version"]  # a refused promote changes nothing


def test_the_service_reloader_follows_a_promotion_of_the_served_link(tmp_path):
    from serve.reload import ModelReloader

    class Loaded:
        def __init__(self, folder):
            self.model_version = json.loads((folder / "model_info.json").read_text())["model_version"]

        def predict(self, texts):
            return []

    class Target:
        runtime = None

    registry = Registry(tmp_path / "models")
    for v in ("v1", "v2"):
        registry.add(fake_model(tmp_path / v, v), {"version": v})
    registry.promote("v1")
    target = Target()
    target.runtime = Loaded(registry.served_link)
    reloader = ModelReloader(registry.served_link, Loaded, target)
    assert not reloader.check().reloaded
    registry.promote("v2")
    result = reloader.check()
    assert result.reloaded and (result.previous_version, result.model_version) == ("v1", "v2")
    assert target.runtime.model_version == "v2"


def test_a_running_service_serves_a_promotion_or_rollback_without_a_signal(pipeline_run, forced_onnx, tmp_path):
    import httpx

    from tests.service_process import ServiceProcess

    registry = Registry(tmp_path / "models")
    first = json.loads((pipeline_run.path("onnx_dir") / "model_info.json").read_text())["model_version"]
    registry.add(pipeline_run.path("onnx_dir"), {"version": first})
    registry.add(forced_onnx, {"version": "forced-word-pairs"})
    registry.promote(first)
    env = {"NER_RELOAD_INTERVAL_S": "0.5"}
    with ServiceProcess(registry.served_link, tmp_path / "serve.log", env=env) as svc, \
            httpx.Client(base_url=svc.url, timeout=30) as client:
        for version in ("forced-word-pairs", first):  # a promotion, then the rollback
            registry.promote(version, reason="test")
            deadline = time.monotonic() + 30
            while client.get("/v1/model").json()["model_version"] != version:
                assert time.monotonic() < deadline, svc.log_tail()
                time.sleep(0.2)
        # a version folder that does not load is tried once, logged, and the served model stays
        (registry.root / registry.get("forced-word-pairs")["folder"] / "crf.json").write_text("{broken")
        registry.promote("forced-word-pairs", reason="broken")
        deadline = time.monotonic() + 30  # wait for the reload attempt, not a fixed time
        while "changed but did not load" not in svc.log_tail(100_000):
            assert time.monotonic() < deadline, svc.log_tail()
            time.sleep(0.2)
        time.sleep(1)  # a second look (the reload interval is shorter) must not try it again
        assert client.get("/v1/model").json()["model_version"] == first
        assert svc.log_tail(100_000).count("changed but did not load") == 1
