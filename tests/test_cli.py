"""The CLI turns input errors into one clear line and a non-zero exit, not a traceback."""

import subprocess
import sys

from tests.conftest import ROOT


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_missing_params_file(tmp_path):
    proc = run_cli("--params", "nope.yaml", "convert", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.yaml: params file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_export_names_the_task_and_keeps_no_partial_output(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "export.json").write_text('[{"id": 17, "data": {"text": "Paris"}, "annotations": '
                                                   '[{"id": 1, "result": [{"type": "labels", "from_name": "label", '
                                                   '"to_name": "text", "value": {"start": 3, "end": 1, '
                                                   '"labels": ["geo-loc"]}}]}]}]')
    params = (ROOT / "params.yaml").read_text().replace("data/labelstudio/export.json", "data/export.json")
    params = params.replace("data/labelstudio/label_config.xml", str(ROOT / "data/labelstudio/label_config.xml"))
    (tmp_path / "params.yaml").write_text(params)
    proc = run_cli("convert", cwd=tmp_path)
    assert proc.returncode == 2
    assert "task 17" in proc.stderr and "negative or reversed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "conll").exists()
