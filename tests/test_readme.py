"""Every command in the README runs as written: the quick ones here, the others by the test named for them.

A README command that is neither run here nor mapped to the test that runs its equivalent (or to the
reason it cannot run on a CI machine) fails `test_every_readme_command_is_run_or_accounted_for`, so a new
command cannot go into the README unchecked.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, VENV_BIN, run

README = ROOT / "README.md"

# Run for real by test_quick_readme_commands_run_as_written, in a project copy that `dvc repro` has run.
QUICK = [
    r"\.venv/bin/dvc plots show",
    r"\.venv/bin/dvc exp show --only-changed",
    r"\.venv/bin/dvc dag",
    r"\.venv/bin/dvc repro -s -f predict",
    r"\.venv/bin/python -m serve --model-dir models/onnx --port 9090",
    r"curl -s localhost:9090/v1/ner ",
    r"\.venv/bin/python scripts/render_plots\.py$",
]
# Run elsewhere in the suite (the file and test that do it) or by CI itself.
COVERED = {
    r"make test": ".ci/run",
    r"\.venv/bin/python -m scripts\.dvc_deps --write": "tests/test_dvc_deps.py::test_stage_deps_are_its_import_closure",
    r"git checkout -- dvclive metrics plots reports && \.venv/bin/dvc checkout":
        "tests/test_dvc_failures.py::test_after_a_failed_train_dvc_checkout_brings_the_last_model_back",
    r"make repro$": "tests/test_pipeline_dvc.py::test_repro_runs_every_stage_and_writes_the_promised_outputs",
    r"make repro-msra": "tests/test_msra_pipeline.py::test_msra_pipeline_runs_end_to_end_with_exact_chinese_offsets",
    r"\.venv/bin/torchrun --standalone --nproc_per_node 2 -m pipeline train":
        "tests/test_train_ddp.py::test_two_process_ddp_matches_one_process",
    r"\.venv/bin/dvc (exp run --queue|queue start|queue status)":
        "tests/test_dvc_experiments.py::test_queued_sweep_runs_each_setting_and_records_params_and_metrics",
    r"\.venv/bin/python -m pipeline pull --project":
        "tests/test_labelstudio_convert.py::test_project_export_converts_like_the_file",
    r"\.venv/bin/python -m pipeline push --project": "tests/test_labelstudio_push.py::test_cli_push_takes_the_server_from_the_environment",
    r"\.venv/bin/python -m pipeline predict$":
        "tests/test_predict_stream.py::test_kill_9_mid_run_then_rerun_gives_identical_shards",
    r"\.venv/bin/dvc repro pipelines/labelstudio/dvc.yaml": "tests/test_labelstudio_push.py::test_dvc_push_stage",
    r"\.venv/bin/python -m pipeline promote": "tests/test_loop_registry.py::test_promote_command_registers_lists_and_rolls_back",
    r"\.venv/bin/python -m pipeline tune|\.venv/bin/dvc exp (show --sort-by|apply tune-)":
        "tests/test_tune.py::test_a_study_runs_experiments_resumes_and_prunes_without_touching_the_workspace",
    r"\.venv/bin/python -m pipeline --params pipelines/msra/params.yaml tune":
        "tests/test_tune.py::test_the_chinese_pipeline_tunes_its_own_train_stage_with_its_own_params",
    r"\.venv/bin/python -m serve --port 9090$":
        "tests/test_loop.py::test_start_training_promotes_a_better_candidate_and_rejects_a_corrupted_one",
}
# Cannot run on a CI machine as written: the reason.
NOT_HERE = {
    r"export LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=\.\.\.": "placeholder secret",
    r"\.venv/bin/dvc exp run -S train\.device=cuda": "needs a GPU",
    r"\.venv/bin/torchrun --standalone --nproc_per_node 4": "needs 4 GPUs",
    r"\.venv/bin/dvc exp run .*(/models/bert-base-c|bert-base-chinese)": "needs the user's BERT folder on disk",
    r"\.venv/bin/python benchmarks/": "benchmarks: minutes to an hour of quiet machine, not tests",
    r"ray start |RAY_ADDRESS=HEAD_IP": "a Ray cluster of several machines (tests/test_predict_ray.py runs a local one)",
    r'pip install "\.\[scale\]"': "make setup installs the scale extra (the Makefile), so make test has it",
}


def fresh_shell(env: dict[str, str]) -> dict[str, str]:
    """The test environment without the virtualenv on PATH, as a new terminal has it."""
    path = [p for p in env["PATH"].split(os.pathsep) if Path(p) != VENV_BIN]
    return {**env, "PATH": os.pathsep.join(path)}


def readme_commands() -> list[str]:
    """Lines of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def rules_matching(command: str) -> list[str]:
    return [p for p in [*QUICK, *COVERED, *NOT_HERE] if re.match(p, command)]


def test_readme_opens_with_the_two_commands_that_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert [b.strip() for b in blocks[:2]] == ["make repro", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_readme_command_is_run_or_accounted_for():
    commands = readme_commands()
    assert len(commands) > 10
    unmatched = [c for c in commands if not rules_matching(c)]
    assert not unmatched, f"README commands no test runs or accounts for: {unmatched}"
    for pattern, where in COVERED.items():
        path, _, name = where.partition("::")
        text = (ROOT / path).read_text(encoding="utf-8")
        assert not name or f"def {name}(" in text, f"{where} (covering {pattern!r}) does not exist"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(pattern: str) -> str:
    [found] = [c for c in readme_commands() if re.match(pattern, c)]
    return found


@pytest.mark.slow
def test_quick_readme_commands_run_as_written(pipeline_run):
    root, env = pipeline_run.root, fresh_shell(pipeline_run.env)  # as written: the venv is not on PATH
    venv = root / ".venv"
    if not venv.exists():
        venv.symlink_to(ROOT / ".venv")

    def sh(cmd: str) -> subprocess.CompletedProcess:
        return run(["bash", "-c", cmd], root, env, timeout=300)

    sh(command(r"\.venv/bin/dvc plots show"))
    page = (root / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    for plot in ("Training loss", "Learning rate per group", "Dev F1", "per_type_f1", "confusion"):
        assert plot in page, f"`dvc plots show` lacks {plot}"
    sh(command(r"\.venv/bin/dvc exp show --only-changed"))
    predictions = pipeline_run.path("predictions")  # a folder: shards and manifest.json

    def predicted() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(predictions.iterdir())}

    before = predicted()
    rerun = sh(command(r"\.venv/bin/dvc repro -s -f predict")).stdout
    assert "Running stage 'predict'" in rerun and predicted() == before and "manifest.json" in before
    dag = sh(command(r"\.venv/bin/dvc dag")).stdout
    assert all(stage in dag for stage in ("convert", "train", "evaluate", "export", "predict"))
    sh(command(r"\.venv/bin/python scripts/render_plots\.py$").replace("scripts/", f"{ROOT}/scripts/"))
    assert (root / "docs" / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    port = str(free_port())  # the one change: 9090 may be taken on a shared machine
    serve = command(r"\.venv/bin/python -m serve --model-dir").replace("9090", port)
    server = subprocess.Popen(["bash", "-c", "exec " + serve],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "server did not get ready in 120 s"
            time.sleep(0.5)
        answer = json.loads(sh(command(r"curl -s localhost:9090/v1/ner ").replace("9090", port)).stdout)
        [result] = answer["results"]
        text = "Obama visited Paris"
        for entity in result["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"]
        assert answer["model_version"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_readme_commands_are_parsed_with_their_continuations():
    commands = readme_commands()
    [msra] = [c for c in commands if "bert-base-chinese" in c]
    assert msra.count(" -S ") == 3 and "\\" not in msra
