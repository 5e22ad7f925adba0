"""Converting a live project (through the SDK) gives the same CoNLL as converting the export file."""

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.labelstudio.client import LabelStudioClient
from tests.conftest import ROOT, tool_env
from tests.test_labelstudio_push import CONFIG_XML

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]


def source_tasks() -> list[dict]:
    tasks = json.loads((ROOT / "data" / "labelstudio" / "export.json").read_text(encoding="utf-8"))[:150]
    extra = [("我爱北京天安门", "北京", "geo-loc"), ("😀👨\u200d👩\u200d👧 Barack Obama 😀", "Barack Obama", "person")]
    for i, (text, sub, label) in enumerate(extra):
        start = text.index(sub)
        tasks.append({"id": 10_000 + i, "data": {"text": text}, "annotations": [{
            "id": 10_000 + i, "was_cancelled": False, "ground_truth": False, "completed_by": 1,
            "result": [{"from_name": "label", "to_name": "text", "type": "labels",
                        "value": {"start": start, "end": start + len(sub), "text": sub, "labels": [label]}}]}]})
    return tasks


def conll_blocks(conll_dir) -> dict[str, list[str]]:
    """Each split's sentences without their task-id line (ids differ between file and project)."""
    out = {}
    for name in ("train", "dev", "test"):
        blocks = (conll_dir / f"{name}.conll").read_text(encoding="utf-8").split("\n\n")
        out[name] = sorted(b.split("\n", 1)[1] for b in blocks if b.strip())
    return out


def run_convert(root, env, *args):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "convert", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_project_export_converts_like_the_file(label_studio, tmp_path):
    tasks = source_tasks()
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    project = client.create_project("convert live", CONFIG_XML)
    client.import_tasks(project, [{"data": t["data"], "annotations": [
        {k: a[k] for k in ("result", "was_cancelled", "ground_truth") if k in a} for a in t["annotations"]]}
        for t in tasks])

    for name in ("file", "live"):
        (tmp_path / name / "data").mkdir(parents=True)
    (tmp_path / "file" / "data" / "export.json").write_text(json.dumps(tasks, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "file" / "data" / "label_config.xml").write_text(CONFIG_XML, encoding="utf-8")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(export="data/export.json", label_config="data/label_config.xml")
    for name in ("file", "live"):
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(tool_env(tmp_path), LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key)

    run_convert(tmp_path / "file", env)
    run_convert(tmp_path / "live", env, "--project", str(project))
    assert not (tmp_path / "live" / "data" / "export.json").exists()  # --project reads the server, not the file

    file_blocks, live_blocks = conll_blocks(tmp_path / "file" / "data" / "conll"), \
        conll_blocks(tmp_path / "live" / "data" / "conll")
    assert live_blocks == file_blocks
    assert sum(len(v) for v in live_blocks.values()) > 100
    file_report = json.loads((tmp_path / "file" / "reports" / "convert.json").read_text())
    live_report = json.loads((tmp_path / "live" / "reports" / "convert.json").read_text())
    for key in ("tasks", "tasks_unlabeled", "annotations_cancelled", "annotations_used"):
        assert live_report["counts"].get(key) == file_report["counts"].get(key), key
    assert live_report["labels"] == file_report["labels"]

    # `pull` snapshots the project into the files that `dvc repro` reads
    proc = subprocess.run([sys.executable, "-m", "pipeline", "pull", "--project", str(project)],
                          cwd=tmp_path / "live", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    pulled = json.loads((tmp_path / "live" / "data" / "export.json").read_text(encoding="utf-8"))
    assert sorted(t["data"]["text"] for t in pulled) == sorted(t["data"]["text"] for t in tasks)
    assert (tmp_path / "live" / "data" / "label_config.xml").read_text() == CONFIG_XML
