"""The CLI turns input errors into one clear line and a non-zero exit, not a traceback."""

import codecs
import gzip
import json
import re
import subprocess
import sys

import pytest

from pipeline.labelstudio.shards import Predictions
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


GOOD_TASK = {"id": 1, "data": {"text": "Zoë visited Paris"}, "annotations": [
    {"id": 10, "result": [{"type": "labels", "from_name": "label", "to_name": "text",
                           "value": {"start": 12, "end": 17, "text": "Paris", "labels": ["geo-loc"]}}]}]}
CONFIG = (ROOT / "data/labelstudio/label_config.xml").read_text(encoding="utf-8")


def project(tmp_path, export: bytes, config: bytes = CONFIG.encode(), bad_tasks: str = "skip"):
    """A folder with params.yaml, an export, a label config, and previous outputs that must survive a failure."""
    (tmp_path / "data" / "conll").mkdir(parents=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "data" / "export.json").write_bytes(export)
    (tmp_path / "data" / "config.xml").write_bytes(config)
    (tmp_path / "data" / "conll" / "train.conll").write_text("previous\n")
    (tmp_path / "reports" / "convert.json").write_text("{}\n")
    params = (ROOT / "params.yaml").read_text().replace("data/labelstudio/export.json", "data/export.json")
    params = params.replace("data/labelstudio/label_config.xml", "data/config.xml")
    (tmp_path / "params.yaml").write_text(params.replace("bad_tasks: error", f"bad_tasks: {bad_tasks}"))


def previous_outputs_untouched(tmp_path):
    return (sorted(p.name for p in (tmp_path / "data" / "conll").iterdir()) == ["train.conll"]
            and (tmp_path / "data" / "conll" / "train.conll").read_text() == "previous\n"
            and (tmp_path / "reports" / "convert.json").read_text() == "{}\n")


def error_lines(stderr):
    return [line for line in stderr.splitlines() if " ERROR " in line]


EXPORT = json.dumps([GOOD_TASK], ensure_ascii=False)


@pytest.mark.parametrize("export,config,message", [
    (b"[" * 100_000 + b"]" * 100_000, None, r"data/export.json: an item that is not a task at line 1, column 2 "
                                            r"\(byte 1\): it nests lists or objects too deeply"),
    (EXPORT.encode("latin-1"), None, rf"data/export.json: is not UTF-8: byte {EXPORT.index('ë')} \(0xEB\)"),
    (EXPORT.encode("utf-16"), None, r"data/export.json: is UTF-16LE \(byte-order mark at byte 0\)"),
    (EXPORT.encode(), CONFIG.replace('"other"', '"othér"').encode("latin-1"),
     r"data/config.xml: is not UTF-8: byte \d+ \(0xE9\)"),
    (EXPORT.encode(), CONFIG.encode("utf-16"), r"data/config.xml: is UTF-16LE"),
])
def test_unreadable_files_fail_in_one_line_and_keep_the_previous_outputs(tmp_path, export, config, message):
    project(tmp_path, export, config or CONFIG.encode())
    proc = run_cli("convert", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert re.search(message, line), line
    assert previous_outputs_untouched(tmp_path)


def test_gzip_and_bom_exports_convert(tmp_path):
    project(tmp_path, gzip.compress(codecs.BOM_UTF8 + EXPORT.encode()))
    proc = run_cli("convert", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "reports" / "convert.json").read_text())["labels"] == {"geo-loc": 1}


def test_a_broken_task_is_skipped_with_a_warning_and_listed_in_the_report(tmp_path):
    bad = {"id": 2, "data": {"text": "Paris"}, "annotations": [None]}
    project(tmp_path, json.dumps([GOOD_TASK, bad]).encode())
    proc = run_cli("convert", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped task 2, field 'annotations[0]': expected an annotation object, got null" in proc.stderr
    report = json.loads((tmp_path / "reports" / "convert.json").read_text())
    assert [(t["task_id"], t["field"]) for t in report["skipped_tasks"]] == [(2, "annotations[0]")]
    assert report["counts"]["tasks_skipped"] == 1


@pytest.mark.parametrize("bad,bad_tasks,message", [
    ({"id": 2, "data": {"text": "Paris"}, "annotations": [{"id": 5, "result": {}}]}, "error",
     "task 2, field 'annotations[id=5].result': expected a list of results, got an object"),
    ({"id": 2, "data": {"text": "Paris"}, "annotations": [{"id": 5, "result": [None]}]}, "error",
     "task 2, field 'annotations[id=5].result[0]': expected a result object, got null"),
    ({"id": 2, "data": {"text": "Paris"}, "annotations": [{"id": 5, "result": [
        {"type": "labels", "from_name": "label", "to_name": "text",
         "value": {"start": 0, "end": 5, "text": 12345, "labels": ["geo-loc"]}}]}]}, "error",
     "task 2, field 'annotations[id=5].result[0].value.text': expected a string, got a number"),
    ({"id": 2, "data": {"text": "Paris \ud800"}, "annotations": []}, "error",
     "task 2, field 'data.text': the text holds a lone surrogate"),
    (None, "skip", "none of the 1 span results matches the label config"),
])
def test_broken_tasks_under_bad_tasks_error_and_renamed_controls_stop_in_one_line(tmp_path, bad, bad_tasks, message):
    renamed = dict(GOOD_TASK, annotations=[{"id": 10, "result": [
        dict(GOOD_TASK["annotations"][0]["result"][0], from_name="ner")]}])
    tasks = [GOOD_TASK, bad] if bad is not None else [renamed]
    project(tmp_path, json.dumps(tasks).encode(), bad_tasks=bad_tasks)
    proc = run_cli("convert", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert message in line, line
    assert previous_outputs_untouched(tmp_path)


def test_convert_takes_its_files_from_flags_without_editing_params(tmp_path):
    project(tmp_path, json.dumps([GOOD_TASK]).encode())  # params.yaml points at data/: left as it is
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "my.json").write_text(json.dumps([GOOD_TASK, dict(GOOD_TASK, id=2)]), encoding="utf-8")
    (other / "config.xml").write_text(CONFIG, encoding="utf-8")
    proc = run_cli("convert", "--export", "elsewhere/my.json", "--label-config", "elsewhere/config.xml",
                   "--out", "elsewhere/conll", "--report", "elsewhere/report.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (other / "conll" / "labels.json").is_file()
    assert json.loads((other / "report.json").read_text())["counts"]["tasks"] == 2
    assert (tmp_path / "data" / "conll" / "train.conll").read_text() == "previous\n"  # params paths untouched
    assert (tmp_path / "reports" / "convert.json").read_text() == "{}\n"
    helped = run_cli("convert", "--help", cwd=tmp_path).stdout
    assert "--export PATH" in helped and "paths.export" in " ".join(helped.split())


@pytest.mark.slow
def test_predict_and_evaluate_take_their_files_from_flags(pipeline_run, tmp_path):
    import shutil

    root = tmp_path / "project"  # a copy: evaluate's plots and error list still go to the params paths
    shutil.copytree(pipeline_run.root, root, symlinks=True)
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"id": 7, "data": {"text": "Barack Obama in Paris"}}]), encoding="utf-8")
    proc = run_cli("predict", "--model", str(pipeline_run.path("onnx_dir")), "--tasks", str(tasks),
                   "--out", str(tmp_path / "out"), cwd=root)
    assert proc.returncode == 0, proc.stderr
    [task] = Predictions(tmp_path / "out")  # a folder: part-00000.json and manifest.json
    assert task["id"] == 7 and task["predictions"][0]["model_version"]

    dev = pipeline_run.path("conll_dir") / "dev.conll"
    proc = run_cli("evaluate", "--model", str(pipeline_run.path("model_dir")), "--data", str(dev),
                   "--out", str(tmp_path / "dev.json"), cwd=root)
    assert proc.returncode == 0, proc.stderr
    scored = json.loads((tmp_path / "dev.json").read_text())["test"]["sentences"]
    assert scored == dev.read_text(encoding="utf-8").count("# task_id")

    missing = run_cli("evaluate", "--data", str(tmp_path / "nope.conll"), cwd=root)
    assert missing.returncode == 2 and "nope.conll: CoNLL file not found" in missing.stderr
    assert "Traceback" not in missing.stderr
